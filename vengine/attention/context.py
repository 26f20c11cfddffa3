"""Per-step attention metadata: built once per forward by the engine, read by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepContext:
    """What one forward step attends over (which backend attends is the model's LayerBackends).

    Prefill steps carry one sequence (a chunk of its prompt); decode steps one token per sequence.
    """

    is_prefill: bool
    slots: torch.Tensor  # [T] flat KV slots (page * page_size + offset) of the new tokens
    block_tables: torch.Tensor  # [B, max_pages] page ids, padded with page 0
    context_lens: torch.Tensor  # [B] tokens in context after this step, new ones included
    seq_ids: tuple[int, ...]  # engine ids of the B sequences, for per-sequence backend state
    cached_len: int = 0  # prefill only: tokens of this sequence cached before this chunk
    # decode only: [B, 3] each sequence's own epsilon and delta (kernels.common.accuracy_targets),
    # NaN where the backend's settings apply
    targets: torch.Tensor | None = None
