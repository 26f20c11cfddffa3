"""GPU copies of the rows each (sequence, layer, KV head) attended exactly in the step before:
its sink, window and predicted top-k, most of which the next step picks again. A step then reads
over PCIe only the exact rows it did not read in the step before. Which rows are attended does
not change, only where each is read from."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vengine.kernels.base import Cached

NONE = 2**31 - 1  # the position of an empty entry: above every real one, so lists stay sorted


class RowCache:
    """rows [L, B, Hkv, W] int32: the positions held per (layer, batch position, KV head),
    ascending, NONE past them; k, v [L, 2, B, Hkv, W, D] in the pool's row dtype: [:, 0] the rows
    held, [:, 1] this step's exact rows as the attention kernel writes them, copied to [:, 0] by
    commit. Entries belong to a position in the decode batch: begin_step forgets a position whose
    sequence changed. Fixed size (CUDA graphs keep the pointers): W rows for B positions."""

    def __init__(self, layers: int, batch: int, kv_heads: int, width: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.batch, self.width = batch, width
        self.rows = torch.full((layers, batch, kv_heads, width), NONE, dtype=torch.int32,
                               device=device)
        self.k = torch.zeros((layers, 2, batch, kv_heads, width, head_dim), dtype=dtype,
                             device=device)
        self.v = torch.zeros_like(self.k)
        self.seq_ids: list[int | None] = [None] * batch

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.k.nbytes + self.v.nbytes

    def begin_step(self, seq_ids: Sequence[int]) -> None:
        """The decode batch's sequences, in order: a position whose sequence changed (or past
        the batch) holds nothing any more."""
        for b in range(self.batch):
            seq_id = seq_ids[b] if b < len(seq_ids) else None
            if self.seq_ids[b] != seq_id:
                self.rows[:, b].fill_(NONE)
                self.seq_ids[b] = seq_id

    def drop(self, seq_id: int) -> None:
        """Forget a sequence's rows (its pages are about to be rewritten or reused)."""
        for b, held in enumerate(self.seq_ids):
            if held == seq_id:
                self.rows[:, b].fill_(NONE)
                self.seq_ids[b] = None

    def covers(self, batch: int, width: int) -> bool:
        """Whether a step of this batch and row-list width fits the cache."""
        return batch <= self.batch and width <= self.width

    def lookup(self, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> Cached:
        """The kernels' view for one layer's exact rows [B, Hkv, R] (the first counts [B, Hkv]
        live, ascending): each row's entry among those held, or -1."""
        B, _, R = rows.shape
        held = self.rows[layer, :B]
        at = torch.searchsorted(held, rows.to(torch.int32)).clamp(max=self.width - 1)
        live = torch.arange(R, device=rows.device) < counts[..., None]
        hit = live & (held.gather(-1, at) == rows)
        src = torch.where(hit, at, -1).to(torch.int32)
        k, v = self.k[layer, :, :B], self.v[layer, :, :B]
        return src, k[0], v[0], k[1], v[1]

    def commit(self, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> None:
        """After the step's exact rows were attended (and written to [:, 1]): hold them."""
        B, _, R = rows.shape
        live = torch.arange(R, device=rows.device) < counts[..., None]
        self.rows[layer, :B, :, :R] = torch.where(live, rows, NONE)
        self.rows[layer, :B, :, R:] = NONE
        self.k[layer, 0, :B, :, :R] = self.k[layer, 1, :B, :, :R]
        self.v[layer, 0, :B, :, :R] = self.v[layer, 1, :B, :, :R]
