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
def _key_kernel(q, codes, scales, tables, hi, out, stats, lo, S, scale, cap, st0, c0, c1, c2, s0,
                s1, s2, HKV: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                GP: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, BITS: tl.constexpr,
                BLOCK: tl.constexpr, CAP: tl.constexpr, STATS: tl.constexpr,
                INTERPRET: tl.constexpr):
    """BLOCK positions of one page and (sequence, KV head), scored against the group's G queries
    without decoding the keys: q . k_hat = q . lo + (q * step) . level, lo and step the page's
    per-channel scales. Channel c's code is bit c % 8 of byte c // 8 in each bit plane (NB =
    D / 8 bytes per plane), so the channels are taken in the order p = (c % 8) * NBP + c // 8:
    the levels [BLOCK, 8, NBP] come from the row's bytes by one shift per bit position, and one
    dot of [BLOCK, 8 * NBP] levels (exact in bf16) with q * step in the same order (split into
    two bf16 halves: f32 accuracy) gives the scores. Why: rows as the dot's M side and one dot
    instead of one per bit position measured 1.9x faster at 128K on the H200 (docs/benchmarks.md).
    q [B*Hkv*G, D] contiguous, out [B*Hkv, G, S] f32; with STATS, each head's (max, sum of exp)
    over the block to stats [B*Hkv*G, blocks, 2] (group_scores' softmax normalisers)."""
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
    x = tl.where(scored[:, None], _soft_cap((base[None, :] + acc) * scale, cap, CAP),
                 float("-inf"))
    tl.store(out + (bh * G + g[None, :]) * S + s[:, None], x,
             mask=(g[None, :] < G) & (s < S)[:, None])
    if STATS:
        mx = tl.max(x, 0)  # [GP]
        total = tl.sum(tl.exp(x - tl.maximum(mx, -3.4028234663852886e38)[None, :]), 0)
        at = stats + ((bh * G + g) * tl.num_programs(1) + tl.program_id(1)) * 2
        tl.store(at, mx, mask=g < G)
        tl.store(at + 1, total, mask=g < G)


@triton.jit
def _head_lse_kernel(stats, lse, n_blocks, BLOCK: tl.constexpr):
    """One query head: the logsumexp of its scores from the blocks' (max, sum of exp); -inf
    scores everywhere give -inf."""
    h = tl.program_id(0).to(tl.int64)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    for j0 in range(0, n_blocks, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        mx = tl.load(stats + (h * n_blocks + j) * 2, mask=j < n_blocks, other=float("-inf"))
        se = tl.load(stats + (h * n_blocks + j) * 2 + 1, mask=j < n_blocks, other=0.0)
        new = tl.maximum(m, tl.max(mx, 0))
        safe = tl.maximum(new, -3.4028234663852886e38)
        total = total * tl.exp(m - safe) + tl.sum(se * tl.exp(mx - safe), 0)
        m = new
    tl.store(lse + h, tl.maximum(m, -3.4028234663852886e38) + tl.maximum(tl.log(total), -1e30))


@triton.jit
def _group_kernel(s_hat, lse, rank_hi, out, S, SINK, HKV: tl.constexpr, G: tl.constexpr,
                  GP: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK positions of one (sequence, KV head): common.group_log_weights of the heads' scores
    (each head's weight the exp of its score less its lse), -inf outside SINK <= s <
    rank_hi[b]."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g = tl.arange(0, GP)
    x = tl.load(s_hat + (bh * G + g[:, None]) * S + s[None, :],
                mask=(g < G)[:, None] & (s < S)[None, :], other=float("-inf"))
    y = x - tl.load(lse + bh * G + g, mask=g < G, other=0.0)[:, None]  # [GP, BLOCK]
    top = tl.maximum(tl.max(y, 0), -3.4028234663852886e38)
    r = top + tl.log(tl.sum(tl.exp(y - top[None, :]), 0))
    keep = (s >= SINK) & (s < tl.load(rank_hi + bh // HKV))
    tl.store(out + bh * S + s, tl.where(keep, r, float("-inf")), mask=s < S)


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
    return _key_scores(q, codes, block_tables, lo, hi, scale, softcap, block, num_warps)[0]


def _key_scores(q, codes, block_tables, lo, hi, scale, softcap, block=BLOCK_S, num_warps=4,
                stats=False):
    """key_scores, and with stats each head's per-block (max, sum of exp) [B*Hq, blocks, 2]."""
    B, Hq, D = q.shape
    packed, scales = codes
    _, Hkv, P, nbytes = packed.shape
    S = block_tables.shape[1] * P
    assert packed.dtype == torch.uint8 and packed.stride(-1) == 1 and scales.stride(-1) == 1
    assert block_tables.stride(1) == 1 and q.dtype in _DTYPES and D % 8 == 0
    out = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    G, block = Hq // Hkv, min(block, P)
    assert P % block == 0, "a block of positions lies in one page"
    n_blocks = triton.cdiv(S, block)
    part = torch.empty(B * Hq, n_blocks, 2, dtype=torch.float32, device=q.device) if stats else out
    _key_kernel[(B * Hkv, n_blocks)](
        q.contiguous(), packed, scales, block_tables, hi.contiguous(), out, part, lo, S, scale,
        softcap or 1.0, block_tables.stride(0), *packed.stride()[:3], *scales.stride()[:3], Hkv,
        G, P, D, _p2(G), D // 8, _p2(D // 8), nbytes * 8 // D, block, bool(softcap), stats,
        _INTERPRET, num_warps=num_warps)
    return out, part


def group_scores(q: torch.Tensor, codes: tuple, block_tables: torch.Tensor, hi: torch.Tensor,
                 sink: int, rank_hi: torch.Tensor, scale: float, softcap: float = 0.0
                 ) -> torch.Tensor:
    """reference.group_scores in three kernels: the key scores with each block's softmax
    normalisers beside, each head's lse from those, then the group's log weights, masked, in
    one pass over the scores. Why: the torch ops of group_log_weights and mask_range (four
    reductions and as many elementwise passes over [B, Hq, S]) cost ~100 us per layer at 128K."""
    B, Hq, _ = q.shape
    Hkv = codes[0].shape[1]
    s_hat, part = _key_scores(q, codes, block_tables, 0, hi, scale, softcap, stats=True)
    lse = torch.empty(B * Hq, dtype=torch.float32, device=q.device)
    _head_lse_kernel[(B * Hq,)](part, lse, part.shape[1], 1024)
    S, G, block = s_hat.shape[-1], Hq // Hkv, 1024
    out = torch.empty(B, Hkv, S, dtype=torch.float32, device=q.device)
    _group_kernel[(B * Hkv, triton.cdiv(S, block))](s_hat, lse, rank_hi.contiguous(), out, S,
                                                    sink, Hkv, G, _p2(G, 1), block)
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
