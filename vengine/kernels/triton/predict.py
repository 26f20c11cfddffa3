"""The predictor: hash scores of every position from the key signatures, and each group's top-k."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vengine.kernels.common import byte_signs
from vengine.kernels.triton.common import _p2

BLOCK_S = 64  # signatures per hash_scores program


@triton.jit
def _hash_kernel(table, sig, tables, hi, out, lo, S, st0, sg0, sg1, sg2, HKV: tl.constexpr,
                 G: tl.constexpr, P: tl.constexpr, NB: tl.constexpr, GP: tl.constexpr,
                 NBP: tl.constexpr, BLOCK: tl.constexpr):
    # table [B*Hkv, G, NB, 256] f32, sig [pages, Hkv, P, NB] u8 paged, out [B*Hkv, G, S] f32
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // HKV, bh % HKV
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g, j = tl.arange(0, GP), tl.arange(0, NBP)
    s_ok, j_ok = s < S, j < NB
    scored = s_ok & (s >= lo) & (s < tl.load(hi + b))
    page = tl.load(tables + b * st0 + s // P, mask=scored, other=0).to(tl.int64)
    byte = tl.load(sig + (page * sg0 + h * sg1 + (s % P) * sg2)[:, None] + j[None, :],
                   mask=scored[:, None] & j_ok[None, :], other=0).to(tl.int32)  # [BLOCK, NBP]
    offs = (g[:, None, None] * NB + j[None, None, :]) * 256 + byte[None, :, :]  # [GP, BLOCK, NBP]
    mask = (g[:, None, None] < G) & j_ok[None, None, :]
    vals = tl.sum(tl.load(table + bh * (G * NB * 256) + offs, mask=mask, other=0.0), axis=2)
    tl.store(out + (bh * G + g[:, None]) * S + s[None, :],
             tl.where(scored[None, :], vals, float("-inf")), mask=(g[:, None] < G) & s_ok[None, :])


@triton.jit
def _top_kernel(values, indices, k_rows, picked, K, sp, HKV: tl.constexpr, KP: tl.constexpr):
    """Marks in picked the best k = k_rows[b] finite values of one (sequence, KV head)'s K
    unsorted top-k candidates (ties: the earlier in the list). The k-th largest is found two bits
    at a time on integer keys ordered as the values, the K candidates held in registers: 16
    rounds of three counts. Why: a sequence's k may be below the batch's k_max, and a sorted
    torch.topk (to keep the first k) cost ~20 us per layer plus the torch ops of the keep mask."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    v = tl.load(values + bh * K + j, mask=j < K, other=float("-inf"))
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2**31  # [0, 2^32)
    finite = v > float("-inf")
    k = tl.minimum(tl.load(k_rows + bh // HKV), tl.sum(finite.to(tl.int64), 0))
    t = tl.zeros([], tl.int64)  # the largest key with at least k keys >= it
    step = tl.full([], 2**30, tl.int64)
    for _ in range(16):  # the three counts of a round are independent: they overlap
        n1 = tl.sum((key >= t + step).to(tl.int32), 0)
        n2 = tl.sum((key >= t + 2 * step).to(tl.int32), 0)
        n3 = tl.sum((key >= t + 3 * step).to(tl.int32), 0)
        t += step * ((n1 >= k).to(tl.int64) + (n2 >= k).to(tl.int64) + (n3 >= k).to(tl.int64))
        step = step // 4
    above = key > t
    tie = key == t
    room = k - tl.sum(above.to(tl.int64), 0)  # ties kept, in list order
    keep = finite & (above | (tie & (tl.cumsum(tie.to(tl.int64), 0) <= room)))
    idx = tl.load(indices + bh * K + j, mask=keep, other=0)
    tl.store(picked + bh * sp + idx, tl.full([KP], 1, tl.int8), mask=keep)


def hash_scores(q: torch.Tensor, planes: torch.Tensor, sig: torch.Tensor,
                block_tables: torch.Tensor, lo: int, hi: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D], planes [Hkv, D, nbits], sig [pages, Hkv, P, nbytes] uint8 read through
    block_tables -> [B, Hq, S] f32, -inf outside lo <= s < hi[b] (see reference)."""
    B, Hq, D = q.shape
    _, Hkv, P, nbytes = sig.shape
    S = block_tables.shape[1] * P
    G = Hq // Hkv
    assert sig.dtype == torch.uint8 and sig.stride(-1) == 1 and planes.shape == (Hkv, D, 8 * nbytes)
    assert block_tables.stride(1) == 1
    w = torch.einsum("bhgd,hdn->bhgn", q.float().view(B, Hkv, G, D), planes.float())
    table = (w.view(B, Hkv, G, nbytes, 8) @ byte_signs(q.device).T).contiguous()
    out = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    grid = (B * Hkv, triton.cdiv(S, BLOCK_S))
    _hash_kernel[grid](table, sig, block_tables, hi.contiguous(), out, lo, S,
                       block_tables.stride(0), *sig.stride()[:3], Hkv, G, P, nbytes, _p2(G, 1),
                       _p2(nbytes, 1), BLOCK_S)
    return out


def pick_top(scores: torch.Tensor, k_max: int, k_rows: torch.Tensor) -> torch.Tensor:
    """reference.pick_top: an unsorted torch.topk, then _top_kernel keeps each sequence's best."""
    B, Hkv, S = scores.shape
    picked = torch.zeros(B, Hkv, S + 1, dtype=torch.int8, device=scores.device)
    if k_max > 0:
        values, indices = scores.topk(k_max, dim=-1, sorted=False)
        KP = _p2(k_max)
        _top_kernel[(B * Hkv,)](values.contiguous(), indices.contiguous(), k_rows.contiguous(),
                                picked, k_max, S + 1, Hkv, KP, num_warps=min(16, max(4, KP // 512)))
    return picked
