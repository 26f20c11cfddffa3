"""Triton GPU kernels for vAttention decode (base.KernelBackend; tested against reference.py).

Why: on the GPU the K/V pool may live in pinned host memory read through a UVA view
(vengine.offload.uva), so every byte a kernel reads is PCIe traffic. Each program therefore owns
one (sequence, KV head) and reads each selected K/V row (in key_scores, each position's key code)
once for all G = Hq / Hkv query heads of the GQA group (the group is padded to >= 16 rows so
tl.dot applies). Row lists are sorted ascending by construction (select.py), which keeps the
reads sequential-ish.

Inputs may be float32, bfloat16 or float16; outputs are float32. The dots run on tensor cores
to about float32 accuracy (common._mma): decode is bound by memory (or PCIe), not by these few
MMAs. One file per concern: store (appends, key codes), predict (key scores, top-k), select (row
lists, proposal), attend (the fetch: row scores, partial attention), estimate (budget, finish).
"""

from vengine.kernels.triton.attend import partial_attention, row_scores
from vengine.kernels.triton.estimate import finish, pilot_budget
from vengine.kernels.triton.predict import group_scores, key_scores, pick_top
from vengine.kernels.triton.select import exact_rows, pilot_rows, proposal_params, second_rows
from vengine.kernels.triton.store import store_rows

__all__ = ["exact_rows", "finish", "group_scores", "key_scores", "partial_attention", "pick_top",
           "pilot_budget", "pilot_rows", "proposal_params", "row_scores", "second_rows",
           "store_rows"]
