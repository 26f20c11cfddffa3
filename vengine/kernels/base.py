"""KernelBackend: the ops every kernel backend (reference, numba_cpu, triton) provides, with shapes.

vattention_decode calls only these, so a backend is anything with them: a module or an object.
Shapes: q [B, Hq, D]; one layer of the paged pool k_pool, v_pool [pages, Hkv, P, D];
block_tables [B, max_pages]; rows [B, Hkv, R] token positions (only the first counts[b, h] are
valid); logw [B, Hkv, R] log importance weights; key codes (KeyCodes) paged like the pool
(S = max_pages * P positions per sequence). The query heads of a GQA group
(G = Hq // Hkv of them) read the same rows. Row selection: picked [B, Hkv, >= S] int8 marks each
group's predicted top-k; u [2, B, Hkv, S] uniform draws (the pilot's, the second sample's);
context_lens [B]. Outputs are float32.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

Resident = tuple[Tensor, Tensor, Tensor]
"""GPU copies of some pages (offload.kv_pool.ResidentPages.layer): slot_of [pages] int32 (-1: no
copy), k_hot, v_hot [slots, Hkv, P, D] with the pool's strides. The pool holds every row too, so
a backend may ignore them (the reference does)."""
KeyCodes = tuple[Tensor, Tensor]
"""(codes [pages, Hkv, P, bits * D / 8] uint8, scales [pages, Hkv, 2, D] float16): one layer's
keys quantised per page and channel (common.encode_pages), kept on the GPU; the predictor
scores every position from them."""
Proposal = tuple[Tensor, Tensor, Tensor]
"""(scores [B, Hkv, S], lse [B, Hkv], n_r [B, Hkv]): the sampling proposal
pr_i = (1 - f) exp(score_i - lse) + f / n_R over the residual R (proposal_params)."""
Cached = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
"""(src [B, Hkv, R] int32, k_held, v_held, k_new, v_new [B, Hkv, W, D]): GPU copies of the rows
a list's sequences read the step before (offload.row_cache.RowCache.lookup): row i is read from
entry src[i] of k_held/v_held where src[i] >= 0, from the pool elsewhere, and written to entry i
of k_new/v_new either way (rows dtype, W >= R). The values are the pool's, so a backend reading
from the pool as well gives the same result: only where a row crosses PCIe changes."""
Partial = tuple[Tensor, Tensor, Tensor]
"""(m [B, Hq], l [B, Hq], acc [B, Hq, D]): unnormalised softmax attention over a row set."""


class KernelBackend(Protocol):
    """The ops of one vAttention decode step, in the order it calls them (store_rows at append)."""

    def store_rows(self, k: Tensor, v: Tensor, slots: Tensor, k_pool: Tensor, v_pool: Tensor,
                   codes: KeyCodes | None = None, resident: Resident | None = None) -> None:
        """Write a step's K/V rows [T, Hkv, D] at flat slots [T] (page * P + offset) into one
        layer's pools (and their pages' GPU copies), then encode into codes each page whose
        last row was written (none where codes is None: exact attention keeps none)."""

    def group_scores(self, q: Tensor, codes: KeyCodes, block_tables: Tensor, hi: Tensor,
                     sink: int, rank_hi: Tensor, scale: float, softcap: float = 0.0) -> Tensor:
        """The ranking [B, Hkv, S] the top-k picks from: each GQA group's predicted log weights
        (common.ranked) of the predicted scores q . k_hat * scale of positions s < hi[b] (k_hat
        decoded from the codes; each backend's key_scores), -inf outside sink <= s < rank_hi[b].
        softcap (here, in row_scores and partial_attention): Gemma 2's cap, common.soft_cap of
        every score, 0 for none."""

    def pick_top(self, scores: Tensor, k_max: int, k_rows: Tensor) -> Tensor:
        """picked [B, Hkv, S + 1] int8 from scores [B, Hkv, S]: 1 at each (b, h)'s k_rows[b]
        highest finite scores (k_rows [B] <= k_max, a host int sizing the buffers); column S is
        scratch."""

    def exact_rows(self, picked: Tensor, context_lens: Tensor, S: int, sink: int, window: int,
                   width: int) -> tuple[Tensor, Tensor]:
        """Rows attended exactly (sink, recent window, picked), ascending [B, Hkv, width] (the
        first width), and counts [B, Hkv]."""

    def proposal_params(self, scores: Tensor, picked: Tensor) -> Tensor:
        """lse [B, Hkv]: logsumexp of the residual's predicted log weights scores [B, Hkv, S]
        (see Proposal)."""

    def pilot_rows(self, picked: Tensor, u: Tensor, prop: Proposal, size: Tensor,
                   context_lens: Tensor, sink: int, window: int, width: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The pilot: residual row i with probability pa_i = min(1, size * pr_i) (kept when
        u[0] < pa; size [B, Hkv]). Lists [B, Hkv, width], counts [B, Hkv], and each listed row's
        pa and pr [B, Hkv, width]."""

    def second_rows(self, picked: Tensor, u: Tensor, prop: Proposal, size: Tensor, c: Tensor,
                    context_lens: Tensor, sink: int, window: int, width: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """The second sample: residual row i outside the pilot with probability
        pc_i = min(1, c * pr_i) (kept when u[1] < pc; c [B, Hkv]). Lists, counts, and each listed
        row's log weight -log(1 - (1 - pa)(1 - pc)) [B, Hkv, width]."""

    def row_scores(self, q: Tensor, k_pool: Tensor, block_tables: Tensor, rows: Tensor,
                   counts: Tensor, scale: float, resident: Resident | None = None,
                   softcap: float = 0.0) -> Tensor:
        """Exact scores q . k * scale of the listed rows: [B, Hq, R], -inf past counts."""

    def partial_attention(self, q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                          rows: Tensor, counts: Tensor, logw: Tensor | None, scale: float,
                          resident: Resident | None = None, scores: Tensor | None = None,
                          softcap: float = 0.0, cache: Cached | None = None) -> Partial:
        """Softmax attention over the listed rows with score bias logw, left unnormalised (see
        Partial); scores: the rows' row_scores when known (K is then not read, and they are
        capped already). cache (not with scores): the rows held from the step before, read
        from there, and this list's rows written beside them (Cached). An empty list gives
        m = -inf, l = 0, acc = 0."""

    def pilot_budget(self, s_b: Tensor, count_b: Tensor, pa_b: Tensor, pr_b: Tensor, m_f: Tensor,
                     l_f: Tensor, cap: Tensor, n_r: Tensor, epsilon: float, delta: float,
                     dev_b: Tensor | None = None, target: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The second sample's size from the pilot (s_b [B, Hq, W] its scores, count_b [B, Hkv],
        pa_b, pr_b [B, Hkv, W]; m_f, l_f [B, Hq] the exact rows' partials; cap, n_r [B, Hkv];
        dev_b [B, Hq, W] the rows' relative squared deviations for the output guarantee):
        m, d_f [B, Hq], c [B, Hkv], the pilot rows' log weights [B, Hkv, W], over_eps [B, Hq]
        (1 where the cap kept a head from its budget) and missed [B, Hq] (1 where a pilot row
        holds at least epsilon of the head's mass). target [B, 3] (common.accuracy_targets):
        per-sequence epsilon and delta, NaN where the layer's apply. reference.pilot_budget
        derives it."""

    def finish(self, part_f: Partial, part_b: Partial, part_s: Partial, m: Tensor, d_f: Tensor
               ) -> tuple[Tensor, Tensor]:
        """The output [B, Hq, D] from the exact rows', the pilot's and the second sample's
        partials, and D_hat [B, Hq] at scale exp(-m)."""
