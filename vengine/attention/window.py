"""Sliding-window layers (Gemma 3's local layers, Mistral's window): exact attention over the
last `window` tokens, K/V in a ring on the compute device, never in the host pool nor sampled.

Per layer and sequence slot the ring holds `window + RING_SLACK` rows; position p lives in row
p % capacity. The slack lets a chat turn that rewrites its last few tokens keep the ring
(`kept`); a longer rewrite starts the sequence over. Keys in (p - window, p] are what token p
attends to, as transformers' sliding-window mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vengine.attention.base import SequenceView
from vengine.attention.context import StepContext
from vengine.attention.full import sdpa
from vengine.errors import HostMemoryError

RING_SLACK = 64  # rows beyond the window: how far a chat turn may rewind and keep the ring


def window_causal_attention(q, k, v, window: int, prev: int, softcap: float = 0.0
                            ) -> torch.Tensor:
    """q [T, Hq, D] at positions prev.. of k, v [prev + T, Hkv, D] (the `prev` keys before the
    chunk, prev < window, then the chunk's own) -> [T, Hq, D], each query over its last `window`
    keys.

    Blocks of `window` queries attend to the `2 * window - 1` keys that can reach them, all
    blocks in one SDPA call with one band mask (no [T, T] mask)."""
    T, Hq, D = q.shape
    B = window
    L = 2 * window - 1
    nb = -(-T // B)
    front = window - 1 - prev  # pad so that block j's keys start at j * B
    S = nb * B + L - B
    kp = k.new_zeros(S, *k.shape[1:])
    vp = v.new_zeros(S, *v.shape[1:])
    kp[front: front + k.shape[0]], vp[front: front + v.shape[0]] = k, v
    kb = kp.unfold(0, L, B).permute(0, 1, 3, 2)  # [nb, Hkv, L, D]
    vb = vp.unfold(0, L, B).permute(0, 1, 3, 2)
    qp = q.new_zeros(nb * B, Hq, D)
    qp[:T] = q
    qb = qp.view(nb, B, Hq, D).transpose(1, 2)  # [nb, Hq, B, D]
    i = torch.arange(B, device=q.device)[:, None]
    t = torch.arange(L, device=q.device)[None, :]
    band = (t >= i) & (t < i + window)  # key t of a block is query i's if within its window
    real = (torch.arange(nb, device=q.device)[:, None] * B + t[0] >= front)  # not front padding
    mask = band[None] & real[:, None, :]
    o = sdpa(qb, kb, vb, mask[:, None], softcap)
    return o.transpose(1, 2).reshape(nb * B, Hq, D)[:T]


class WindowAttention:
    """The backend of every sliding-window layer of a model (layers indexed 0.. among them)."""

    name = "window"
    graphable = True
    generator = None

    def __init__(self, num_layers: int, window: int, num_kv_heads: int, head_dim: int,
                 slots: int, dtype: torch.dtype, device: torch.device, softcap: float = 0.0
                 ) -> None:
        self.window, self.capacity, self.device = window, window + RING_SLACK, device
        self.softcap = softcap
        shape = (num_layers, slots, num_kv_heads, self.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_of: dict[int, int] = {}
        self.free_slots = list(range(slots - 1, -1, -1))
        self.step_slots = torch.zeros(slots, dtype=torch.long, device=device)  # decode's rows
        self.ring_rows = torch.arange(self.capacity, device=device)

    @staticmethod
    def ring_bytes(num_layers: int, window: int, num_kv_heads: int, head_dim: int,
                   dtype_bytes: int) -> int:
        """Device bytes of one sequence's rings (what the memory plan counts per slot)."""
        return 2 * num_layers * num_kv_heads * (window + RING_SLACK) * head_dim * dtype_bytes

    def _slot(self, seq_id: int) -> int:
        if seq_id not in self.slot_of:
            if not self.free_slots:
                raise HostMemoryError(f"all {len(self.slot_of)} sliding-window KV rings are in "
                                      "use (raise max_batch / --batch-size)")
            self.slot_of[seq_id] = self.free_slots.pop()
        return self.slot_of[seq_id]

    def begin_step(self, seqs: Sequence[SequenceView], is_prefill: bool) -> None:
        slots = torch.tensor([self._slot(s.seq_id) for s in seqs])
        if self.device.type == "cuda":
            slots = slots.pin_memory()
        self.step_slots[: len(seqs)].copy_(slots, non_blocking=True)

    def prefill(self, layer: int, q, k, v, ctx: StepContext) -> torch.Tensor:
        slot, start, T = self.slot_of[ctx.seq_ids[0]], ctx.cached_len, q.shape[0]
        prev = min(start, self.window - 1)
        rows = torch.arange(start - prev, start, device=q.device) % self.capacity
        kc = torch.cat([self.k[layer, slot][:, rows].transpose(0, 1), k])
        vc = torch.cat([self.v[layer, slot][:, rows].transpose(0, 1), v])
        out = window_causal_attention(q, kc, vc, self.window, prev, self.softcap)
        keep = min(T, self.capacity)  # the chunk's last rows go to the ring
        rows = torch.arange(start + T - keep, start + T, device=q.device) % self.capacity
        self.k[layer, slot][:, rows] = k[T - keep:].transpose(0, 1)
        self.v[layer, slot][:, rows] = v[T - keep:].transpose(0, 1)
        return out

    def decode(self, layer: int, q, k, v, ctx: StepContext) -> torch.Tensor:
        B, Hq, D = q.shape
        slots, pos = self.step_slots[:B], ctx.context_lens - 1
        self.k[layer, slots, :, pos % self.capacity] = k
        self.v[layer, slots, :, pos % self.capacity] = v
        age = (pos[:, None] - self.ring_rows) % self.capacity
        valid = (age < self.window) & (age <= pos[:, None])  # [B, capacity]
        kr, vr = self.k[layer, slots], self.v[layer, slots]  # [B, Hkv, capacity, D]
        Hkv = kr.shape[1]
        o = sdpa(q.view(B, Hkv, Hq // Hkv, D), kr, vr, valid[:, None, None, :], self.softcap)
        return o.reshape(B, Hq, D)

    def kept(self, seq_id: int, cached: int, keep: int) -> int:
        """How many of `cached` tokens stay valid when a turn keeps the first `keep`: all of
        them while the ring still holds keep's window, else none (the sequence starts over)."""
        return keep if keep >= cached - RING_SLACK else 0

    def step_stats(self):
        return None

    def end_step(self, seq_ids, stats) -> None:
        pass

    def free(self, seq_id: int) -> None:
        slot = self.slot_of.pop(seq_id, None)
        if slot is not None:
            self.free_slots.append(slot)

    def seq_stats(self, seq_id: int) -> dict[str, float]:
        return {"density": 1.0}
