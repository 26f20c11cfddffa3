"""The predictor: scores of every position from the key codes (q . k_hat, k_hat the key its
page's few-bit codes and scales stand for, scored without decoding it), and each group's
top-k."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vengine.kernels.triton.common import _DTYPES, _INTERPRET, _p2, _soft_cap

BLOCK_S = 64  # positions per key_scores program, at most a page (with 4 warps the fastest of
# 16-64 x 1-8 warps at 128K on the H200: benchmarks/selection_gpu.py, docs/selection_gpu.json)


@triton.jit
def _key_kernel(q, codes, scales, tables, hi, out, lo, S, scale, cap, st0, c0, c1, c2, s0, s1,
                s2, HKV: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                GP: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, BITS: tl.constexpr,
                BLOCK: tl.constexpr, CAP: tl.constexpr, INTERPRET: tl.constexpr):
    """BLOCK positions of one page and (sequence, KV head), scored against the group's G queries
    without decoding the keys: q . k_hat = q . lo + (q * step) . level, lo and step the page's
    per-channel scales. Channel c's code is bit c % 8 of byte c // 8 in each bit plane (NB =
    D / 8 bytes per plane), so the channels are taken in the order p = (c % 8) * NBP + c // 8:
    the levels [BLOCK, 8, NBP] come from the row's bytes by one shift per bit position, and one
    dot of [BLOCK, 8 * NBP] levels (exact in bf16) with q * step in the same order (split into
    two bf16 halves: f32 accuracy) gives the scores. Why: rows as the dot's M side and one dot
    instead of one per bit position measured 1.9x faster at 128K on the H200 (docs/benchmarks.md).
    q [B*Hkv*G, D] contiguous, out [B*Hkv, G, S] f32."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // HKV, bh % HKV
    first = tl.program_id(1) * BLOCK
    s = first + tl.arange(0, BLOCK)
    scored = (s < S) & (s >= lo) & (s < tl.load(hi + b))
    page = tl.load(tables + b * st0 + first // P).to(tl.int64)  # BLOCK divides P: one page
    i, g, bit = tl.arange(0, NBP), tl.arange(0, GP), tl.arange(0, 8)
    c = tl.reshape(8 * i[None, :] + bit[:, None], [8 * NBP])  # the channel at each place p
    c_ok = tl.reshape((i < NB)[None, :] & (bit >= 0)[:, None], [8 * NBP]) & (c < D)
    qc = tl.load(q + (bh * G + g[:, None]) * D + c[None, :],
                 mask=(g[:, None] < G) & c_ok[None, :], other=0.0).to(tl.float32)  # [GP, 8NBP]
    sc = scales + page * s0 + h * s1
    base = tl.sum(qc * tl.load(sc + c, mask=c_ok, other=0.0).to(tl.float32)[None, :], 1)
    qs = qc * tl.load(sc + s2 + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    row = codes + page * c0 + h * c1 + (s % P)[:, None] * c2 + i[None, :]  # [BLOCK, NBP]
    ok = scored[:, None] & (i < NB)[None, :]
    level = tl.zeros([BLOCK, 8, NBP], tl.int32)
    for j in tl.static_range(BITS):
        byte = tl.load(row + j * NB, mask=ok, other=0).to(tl.int32)
        level |= ((byte[:, None, :] >> bit[None, :, None]) & 1) << j
    if INTERPRET:  # the interpreter garbles int -> bf16 and bf16 dots: the same products in f32
        lv = tl.reshape(level, [BLOCK, 8 * NBP]).to(tl.float32)
        acc = tl.dot(lv, tl.trans(qs), input_precision="ieee")
    else:
        lv = tl.reshape(level, [BLOCK, 8 * NBP]).to(tl.bfloat16)
        qs_hi = qs.to(tl.bfloat16)
        qs_lo = (qs - qs_hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(lv, tl.trans(qs_hi), tl.dot(lv, tl.trans(qs_lo)))  # [BLOCK, GP]
    x = _soft_cap((base[None, :] + acc) * scale, cap, CAP)
    tl.store(out + (bh * G + g[None, :]) * S + s[:, None],
             tl.where(scored[:, None], x, float("-inf")), mask=(g[None, :] < G) & (s < S)[:, None])


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


def key_scores(q: torch.Tensor, codes: tuple, block_tables: torch.Tensor, lo: int,
               hi: torch.Tensor, scale: float, softcap: float = 0.0, block: int = BLOCK_S,
               num_warps: int = 4) -> torch.Tensor:
    """q [B, Hq, D] and codes (base.KeyCodes) read through block_tables -> [B, Hq, S] f32:
    q . k_hat * scale, -inf outside lo <= s < hi[b] (reference.key_scores). Each program reads
    its `block` positions' codes (within one page) once for the G query heads of the group."""
    B, Hq, D = q.shape
    packed, scales = codes
    _, Hkv, P, nbytes = packed.shape
    S = block_tables.shape[1] * P
    assert packed.dtype == torch.uint8 and packed.stride(-1) == 1 and scales.stride(-1) == 1
    assert block_tables.stride(1) == 1 and q.dtype in _DTYPES and D % 8 == 0
    out = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    G, block = Hq // Hkv, min(block, P)
    assert P % block == 0, "a block of positions lies in one page"
    _key_kernel[(B * Hkv, triton.cdiv(S, block))](
        q.contiguous(), packed, scales, block_tables, hi.contiguous(), out, lo, S, scale,
        softcap or 1.0, block_tables.stride(0), *packed.stride()[:3], *scales.stride()[:3], Hkv,
        G, P, D, _p2(G), D // 8, _p2(D // 8), nbytes * 8 // D, block, bool(softcap),
        _INTERPRET, num_warps=num_warps)
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
