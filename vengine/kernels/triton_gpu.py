"""Triton GPU kernels for vAttention decode; same interface as vengine.kernels.reference.

Why: on the GPU the K/V pool may live in pinned host memory read through a UVA view
(vengine.offload.uva), so every byte a kernel reads is PCIe traffic. Each program therefore owns
one (sequence, KV head) and reads each selected K/V row once for all G = Hq / Hkv query heads of
the GQA group (the group is padded to >= 16 rows so tl.dot applies). Row lists are sorted
ascending by construction (exact_rows, pilot_rows, second_rows), which keeps the reads
sequential-ish. Long row lists are split over programs flash-decoding style: each split writes
unnormalised online-softmax partials and a second kernel combines the splits. The number of splits
comes from the padded row-buffer width R (a host int), so no host sync on the counts is needed;
splits past a list's count are empty.

Inputs may be float32, bfloat16 or float16; outputs are float32. The dots run on tensor cores
to about float32 accuracy (_mma): decode is bound by memory (or PCIe), not by these few MMAs.
"""

from __future__ import annotations

from statistics import NormalDist

import torch
import triton
import triton.language as tl

from vengine.kernels.common import (  # noqa: F401  (byte_signs, pack_signatures: re-exports)
    PROPOSAL_FLOOR, PROPOSAL_TEMPERATURE, byte_signs, pack_signatures, sample_z)

CHUNK = 256  # rows per partial_attention program (one flash-decoding split)
BLOCK_R = 64  # rows per inner step
BLOCK_S = 64  # signatures per hash_scores program
SPLIT = 4096  # context positions per row-selection program
BLOCK_SEL = 1024  # positions per row-selection inner step


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


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
def _store_kernel(k, v, slots, planes, k_pool, v_pool, sig, slot_of, k_hot, v_hot, T, sk0, sk1,
                  sv0, sv1, pk0, pk1, pk2, pv0, pv1, pv2, sg0, sg1, sg2, P: tl.constexpr,
                  D: tl.constexpr, DP: tl.constexpr, NBITS: tl.constexpr, NBP: tl.constexpr,
                  BLOCK: tl.constexpr, HOT: tl.constexpr, INTERPRET: tl.constexpr):
    """BLOCK tokens of one KV head: K/V rows to the pools (and to their pages' GPU copies, if
    any: HOT, the pools' strides), sign bits of k . planes packed to sig."""
    h = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d, j = tl.arange(0, DP), tl.arange(0, NBP)
    ok = t < T
    okd = ok[:, None] & (d < D)[None, :]
    slot = tl.load(slots + t, mask=ok, other=0).to(tl.int64)
    page, off = slot // P, slot % P
    kx = tl.load(k + t[:, None] * sk0 + h * sk1 + d[None, :], mask=okd, other=0.0)
    vx = tl.load(v + t[:, None] * sv0 + h * sv1 + d[None, :], mask=okd, other=0.0)
    tl.store(k_pool + (page * pk0 + h * pk1 + off * pk2)[:, None] + d[None, :],
             kx.to(k_pool.dtype.element_ty), mask=okd)
    tl.store(v_pool + (page * pv0 + h * pv1 + off * pv2)[:, None] + d[None, :],
             vx.to(v_pool.dtype.element_ty), mask=okd)
    if HOT:
        hot = tl.load(slot_of + page, mask=ok, other=-1).to(tl.int64)
        okh = okd & (hot >= 0)[:, None]
        tl.store(k_hot + (hot * pk0 + h * pk1 + off * pk2)[:, None] + d[None, :],
                 kx.to(k_pool.dtype.element_ty), mask=okh)
        tl.store(v_hot + (hot * pv0 + h * pv1 + off * pv2)[:, None] + d[None, :],
                 vx.to(v_pool.dtype.element_ty), mask=okh)
    pl = tl.load(planes + (h * D + d[:, None]) * NBITS + j[None, :],
                 mask=(d < D)[:, None] & (j < NBITS)[None, :], other=0.0)
    bits = (_mma(kx, pl, INTERPRET) > 0).to(tl.int32) << (j % 8)[None, :]  # [BLOCK, NBP]
    packed = tl.sum(tl.reshape(bits, (BLOCK, NBP // 8, 8)), 2)
    nb = tl.arange(0, NBP // 8)
    tl.store(sig + (page * sg0 + h * sg1 + off * sg2)[:, None] + nb[None, :],
             packed.to(tl.uint8), mask=ok[:, None] & (nb < NBITS // 8)[None, :])


@triton.jit
def _mma(a, b, INTERPRET: tl.constexpr):
    """a @ b to about f32 accuracy, f32 accumulation. 16-bit b: a = hi + lo, both in b's dtype, two
    tensor-core dots (exact products). f32 b: tf32x3 ("ieee" lowers to slow FMA loops)."""
    if b.dtype == tl.float32:
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b, input_precision="ieee")
        return tl.dot(a.to(tl.float32), b, input_precision="tf32x3")
    hi = a.to(b.dtype)
    lo = (a.to(tl.float32) - hi.to(tl.float32)).to(b.dtype)
    if INTERPRET:  # the interpreter's dot garbles bf16: the same exact products, in f32
        b = b.to(tl.float32)
        return (tl.dot(hi.to(tl.float32), b, input_precision="ieee")
                + tl.dot(lo.to(tl.float32), b, input_precision="ieee"))
    return tl.dot(hi, b, tl.dot(lo, b))


@triton.jit
def _load_q(q, bh, G: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr):
    """The group's queries [GP, DP] (zero padded); q is [B*Hkv*G, D] contiguous."""
    g, d = tl.arange(0, GP), tl.arange(0, DP)
    return tl.load(q + (bh * G + g[:, None]) * D + d[None, :],
                   mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)


@triton.jit
def _load_rows(pool, hot, slot_of, tables, row_ptr, live, b, h, st0, s0, s1, s2,
               P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HOT: tl.constexpr):
    """Rows [BLOCK_R, DP] of pool [pages, Hkv, P, D] at token positions row_ptr (0 if dead). With
    HOT, rows of pages that have a GPU copy (slot_of[page] >= 0, in hot [slots, Hkv, P, D], the
    pool's strides) are read from it; only the others cross PCIe."""
    r = tl.load(row_ptr, mask=live, other=0)
    page = tl.load(tables + b * st0 + r // P, mask=live, other=0).to(tl.int64)
    d = tl.arange(0, DP)
    d_ok = (d < D)[None, :]
    offs = h * s1 + (r % P) * s2
    if HOT:
        slot = tl.load(slot_of + page, mask=live, other=-1).to(tl.int64)
        on_gpu = (slot >= 0)[:, None]
        x_host = tl.load((pool + page * s0 + offs)[:, None] + d[None, :],
                         mask=live[:, None] & d_ok & ~on_gpu, other=0.0)
        x_hot = tl.load((hot + slot * s0 + offs)[:, None] + d[None, :],
                        mask=live[:, None] & d_ok & on_gpu, other=0.0)
        return tl.where(on_gpu, x_hot, x_host)
    return tl.load((pool + page * s0 + offs)[:, None] + d[None, :], mask=live[:, None] & d_ok,
                   other=0.0)


@triton.jit
def _row_kernel(q, k_pool, k_hot, slot_of, tables, rows, counts, out, scale, R, st0, sr0, sr1,
                sk0, sk1, sk2, HKV: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
                D: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                HOT: tl.constexpr, INTERPRET: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // HKV, bh % HKV
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = i < tl.load(counts + bh)
    k = _load_rows(k_pool, k_hot, slot_of, tables, rows + b * sr0 + h * sr1 + i, live, b, h, st0,
                   sk0, sk1, sk2, P, D, DP, HOT)
    s = _mma(_load_q(q, bh, G, D, GP, DP), tl.trans(k), INTERPRET) * scale
    s = tl.where(live[None, :], s, float("-inf"))  # [GP, BLOCK]
    g = tl.arange(0, GP)
    tl.store(out + (bh * G + g[:, None]) * R + i[None, :], s,
             mask=(g[:, None] < G) & (i[None, :] < R))


@triton.jit
def _attn_kernel(q, k_pool, v_pool, k_hot, v_hot, slot_of, tables, rows, counts, logw, scores,
                 m_out, l_out, acc_out, scale, R, st0, sr0, sr1, sw0, sw1, sw2, sk0, sk1, sk2, sv0,
                 sv1, sv2, HKV: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                 GP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, CHUNK_: tl.constexpr,
                 HAS_W: tl.constexpr, HAS_S: tl.constexpr, HOT: tl.constexpr,
                 INTERPRET: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    b, h = bh // HKV, bh % HKV
    qt = _load_q(q, bh, G, D, GP, DP)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    start = split * CHUNK_
    end = tl.minimum(start + CHUNK_, tl.load(counts + bh))  # end <= start: an empty split
    for r0 in range(start, end, BLOCK):
        i = r0 + tl.arange(0, BLOCK)
        live = i < end
        row_ptr = rows + b * sr0 + h * sr1 + i
        if HAS_S:  # the rows' scores are known (row_scores): K is not read again
            g = tl.arange(0, GP)
            s = tl.load(scores + (bh * G + g[:, None]) * R + i[None, :],
                        mask=(g[:, None] < G) & live[None, :], other=float("-inf"))
        else:
            k = _load_rows(k_pool, k_hot, slot_of, tables, row_ptr, live, b, h, st0, sk0, sk1,
                           sk2, P, D, DP, HOT)
            s = _mma(qt, tl.trans(k), INTERPRET) * scale  # [GP, BLOCK]
        if HAS_W:
            w = tl.load(logw + b * sw0 + h * sw1 + i * sw2, mask=live, other=0.0)
            s += w.to(tl.float32)[None, :]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = _load_rows(v_pool, v_hot, slot_of, tables, row_ptr, live, b, h, st0, sv0, sv1, sv2,
                       P, D, DP, HOT)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mma(p, v, INTERPRET)
        m = m_new
    g, d = tl.arange(0, GP), tl.arange(0, DP)
    slot = (bh * G + g) * n_splits + split  # [B, Hq, n_splits] scratch
    tl.store(m_out + slot, m, mask=g < G)
    tl.store(l_out + slot, l, mask=g < G)
    tl.store(acc_out + slot[:, None] * D + d[None, :], acc,
             mask=(g[:, None] < G) & (d[None, :] < D))


@triton.jit
def _combine_kernel(m, l, acc, m_out, l_out, acc_out, NS, D: tl.constexpr, NSP: tl.constexpr,
                    DP: tl.constexpr):
    """One query head: the flash-decoding splits' partials [NS] rescaled to their common max."""
    i = tl.program_id(0).to(tl.int64)
    j, d = tl.arange(0, NSP), tl.arange(0, DP)
    ms = tl.load(m + i * NS + j, mask=j < NS, other=float("-inf"))
    top = tl.max(ms, 0)
    c = tl.exp(ms - tl.maximum(top, -3.4028234663852886e38))  # all -inf (no rows): c = 0
    a = tl.load(acc + (i * NS + j[:, None]) * D + d[None, :],
                mask=(j[:, None] < NS) & (d[None, :] < D), other=0.0)
    tl.store(m_out + i, top)
    tl.store(l_out + i, tl.sum(tl.load(l + i * NS + j, mask=j < NS, other=0.0) * c, 0))
    tl.store(acc_out + i * D + d, tl.sum(a * c[:, None], 0), mask=d < D)


@triton.jit
def _rows_kernel(picked, scores, u, inv_t_, lse_, n_r_, size_, c_, lens, counts, total, rows,
                 aux0, aux1, width, S, NBH, sp, SINK, WINDOW, FLOOR, HKV: tl.constexpr,
                 MODE: tl.constexpr, WRITE: tl.constexpr, SPLIT_: tl.constexpr,
                 BLOCK: tl.constexpr, NSP: tl.constexpr):
    """One split of the positions of one (sequence, KV head). MODE 0: the exact rows (sink,
    window or picked). MODE 1: the pilot, residual rows with u0 < pa = min(1, size * pr), pa and
    pr listed beside (aux0, aux1). MODE 2: the second sample, residual rows with u0 >= pa and
    u1 < pc = min(1, c * pr), the log weight -log(1 - (1 - pa)(1 - pc)) beside (aux0). The
    proposal pr = (1 - FLOOR) exp(score * inv_t - lse) + FLOOR / n_r (reference.proposal); the
    per-head inv_t, lse, n_r, size and c are [NBH] f32. Pass 1 (WRITE False) counts rows per
    split; pass 2 writes them, ascending, from the split's offset (the sum of the earlier splits'
    counts), and split 0 writes the list's length, at most width. scores, u [2, NBH, S] and the
    lists [NBH, width] are contiguous."""
    bh = tl.program_id(0).to(tl.int64)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    b = bh // HKV
    n = tl.load(lens + b)
    start = split * SPLIT_
    end = tl.minimum(start + SPLIT_, n)
    if MODE > 0:
        inv_t, lse = tl.load(inv_t_ + bh), tl.load(lse_ + bh)
        floor = FLOOR / tl.maximum(tl.load(n_r_ + bh), 1.0)
        size = tl.load(size_ + bh)
        if MODE == 2:
            c = tl.load(c_ + bh)
    count = tl.zeros([], tl.int32)
    if WRITE:
        j = tl.arange(0, NSP)
        per_split = tl.load(counts + bh * n_splits + j, mask=j < n_splits, other=0)
        count += tl.sum(tl.where(j < split, per_split, 0), 0)
        if split == 0:
            tl.store(total + bh, tl.minimum(tl.sum(per_split, 0), width).to(tl.int64))
    for s0 in range(start, end, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        valid = s < end
        keep = valid & ((s < SINK) | (s >= n - WINDOW))
        keep |= valid & (tl.load(picked + bh * sp + s, mask=valid, other=0) != 0)
        if MODE > 0:
            resid = valid & ~keep
            x = tl.load(scores + bh * S + s, mask=resid, other=float("-inf"))
            pr = (1 - FLOOR) * tl.exp(x * inv_t - lse) + floor
            pa = tl.minimum(size * pr, 1.0)
            u0 = tl.load(u + bh * S + s, mask=valid, other=1.0)
            if MODE == 1:
                keep = resid & (u0 < pa)
            else:
                pc = tl.minimum(c * pr, 1.0)
                u1 = tl.load(u + (NBH + bh) * S + s, mask=valid, other=1.0)
                keep = resid & (u0 >= pa) & (u1 < pc)
        k = keep.to(tl.int32)
        if WRITE:
            slot = count + tl.cumsum(k, 0) - 1
            out = keep & (slot < width)
            tl.store(rows + bh * width + slot, s.to(tl.int64), mask=out)
            if MODE == 1:
                tl.store(aux0 + bh * width + slot, pa, mask=out)
                tl.store(aux1 + bh * width + slot, pr, mask=out)
            if MODE == 2:
                w = -tl.log(tl.maximum(1 - (1 - pa) * (1 - pc), 1e-30))
                tl.store(aux0 + bh * width + slot, w, mask=out)
        count += tl.sum(k, 0)
    if not WRITE:
        tl.store(counts + bh * n_splits + split, count)


@triton.jit
def _proposal_kernel(scores, picked, stats1, stats2, inv_t, S, sp, TEMP, SPLIT_: tl.constexpr,
                     BLOCK: tl.constexpr, NSP: tl.constexpr, PASS: tl.constexpr):
    """One split of one (sequence, KV head)'s residual (finite score, not picked): pass 1 its
    count, sum and sum of squares (stats1 [NBH, splits, 3]); pass 2 the max and sum of
    exp(score * inv_t - max) (stats2 [NBH, splits, 2]), inv_t = 1 / (TEMP * sd) from all of pass
    1's splits (split 0 stores it)."""
    bh = tl.program_id(0).to(tl.int64)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    a = tl.zeros([], tl.float32)
    b = tl.zeros([], tl.float32)
    sq = tl.zeros([], tl.float32)
    mx = tl.full([], float("-inf"), tl.float32)
    if PASS == 2:
        j = tl.arange(0, NSP)
        part = stats1 + (bh * n_splits + j) * 3
        n = tl.maximum(tl.sum(tl.load(part, mask=j < n_splits, other=0.0), 0), 1.0)
        mean = tl.sum(tl.load(part + 1, mask=j < n_splits, other=0.0), 0) / n
        var = tl.maximum(tl.sum(tl.load(part + 2, mask=j < n_splits, other=0.0), 0) / n
                         - mean * mean, 0.0)
        it = 1 / (TEMP * tl.maximum(tl.sqrt(var), 1e-6))
        if split == 0:
            tl.store(inv_t + bh, it)
    for s0 in range(split * SPLIT_, tl.minimum(split * SPLIT_ + SPLIT_, S), BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        valid = s < S
        x = tl.load(scores + bh * S + s, mask=valid, other=float("-inf"))
        resid = (x > float("-inf")) & (tl.load(picked + bh * sp + s, mask=valid, other=1) == 0)
        if PASS == 1:
            a += tl.sum(resid.to(tl.float32), 0)
            b += tl.sum(tl.where(resid, x, 0.0), 0)
            sq += tl.sum(tl.where(resid, x * x, 0.0), 0)
        else:
            y = tl.where(resid, x * it, float("-inf"))
            new = tl.maximum(mx, tl.max(y, 0))
            safe = tl.where(new == float("-inf"), 0.0, new)
            b = b * tl.exp(mx - safe) + tl.sum(tl.exp(y - safe), 0)
            mx = new
    if PASS == 1:
        out = stats1 + (bh * n_splits + split) * 3
        tl.store(out, a)
        tl.store(out + 1, b)
        tl.store(out + 2, sq)
    else:
        out = stats2 + (bh * n_splits + split) * 2
        tl.store(out, mx)
        tl.store(out + 1, b)


@triton.jit
def _lse_kernel(stats2, lse, n_splits, NSP: tl.constexpr):
    """One (sequence, KV head): logsumexp from the splits' (max, sum of exp) of _proposal_kernel
    pass 2; -inf for an empty residual."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NSP)
    mx = tl.load(stats2 + (bh * n_splits + j) * 2, mask=j < n_splits, other=float("-inf"))
    se = tl.load(stats2 + (bh * n_splits + j) * 2 + 1, mask=j < n_splits, other=0.0)
    top = tl.maximum(tl.max(mx, 0), -3.4028234663852886e38)
    tl.store(lse + bh, top + tl.log(tl.sum(se * tl.exp(mx - top), 0)))


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


@triton.jit
def _budget_kernel(s_b, count_b, pa_b, pr_b, m_f, l_f, cap, n_r, m_out, d_f_out, c_out,
                   logw_out, over_out, W, Z, ZA, EPS, FLOOR, G: tl.constexpr, GP: tl.constexpr,
                   BW: tl.constexpr):
    """One (sequence, KV head): reference.pilot_budget. s_b [NBH, G, W]; pa_b, pr_b, logw_out
    [NBH, W]; the per-head tensors [NBH, G]; count_b, cap, n_r, c_out [NBH]."""
    bh = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GP)
    gm = g < G
    nb = tl.load(count_b + bh).to(tl.float32)
    lim = tl.load(cap + bh)
    mf = tl.load(m_f + bh * G + g, mask=gm, other=0.0)  # padding heads: finite, unused
    lf = tl.load(l_f + bh * G + g, mask=gm, other=0.0)
    row = s_b + (bh * G + g[:, None]) * W
    m = mf
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        x = tl.load(row + w[None, :], mask=gm[:, None] & (w < W)[None, :], other=float("-inf"))
        m = tl.maximum(m, tl.max(x, 1))
    d = lf * tl.exp(mf - m)
    d_f = d
    a_sum = tl.zeros([GP], tl.float32)
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        live = w < nb
        x = tl.exp(tl.load(row + w[None, :], mask=gm[:, None] & (w < W)[None, :],
                           other=float("-inf")) - m[:, None])
        pa = tl.load(pa_b + bh * W + w, mask=live, other=1.0)
        pr = tl.load(pr_b + bh * W + w, mask=live, other=1.0)
        e = tl.where(live[None, :], x / tl.maximum(pa, 1e-30)[None, :], 0.0)
        d += tl.sum(e, 1)
        a_sum += tl.sum(e * x / tl.maximum(pr, 1e-30)[None, :], 1)
    infl = _chi2_factor(nb, ZA)
    c_head = infl * a_sum / tl.maximum((EPS * d / Z) * (EPS * d / Z), 1e-30)
    c_head = tl.where(nb >= 2, c_head, float("inf"))
    c = tl.minimum(tl.max(tl.where(gm, c_head, float("-inf")), 0), lim)
    tl.store(m_out + bh * G + g, m, mask=gm)
    tl.store(d_f_out + bh * G + g, d_f, mask=gm)
    bar = tl.where(c < tl.load(n_r + bh) / FLOOR, c * (1 + 1e-4), float("inf"))  # all in: none
    tl.store(over_out + bh * G + g, tl.where(c_head > bar, 1.0, 0.0), mask=gm)
    tl.store(c_out + bh, c)
    infl1 = _chi2_factor(nb - 1, ZA)  # the budget without one pilot row: its own terms out
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        live = w < nb
        x = tl.exp(tl.load(row + w[None, :], mask=gm[:, None] & (w < W)[None, :],
                           other=float("-inf")) - m[:, None])
        pa = tl.load(pa_b + bh * W + w, mask=live, other=1.0)
        pr = tl.load(pr_b + bh * W + w, mask=live, other=1.0)
        e = x / tl.maximum(pa, 1e-30)[None, :]
        a = e * x / tl.maximum(pr, 1e-30)[None, :]
        d_loo = tl.maximum(d[:, None] - e, 0.0)
        c_loo = infl1 * (a_sum[:, None] - a) / tl.maximum(
            (EPS * d_loo / Z) * (EPS * d_loo / Z), 1e-30)
        c_loo = tl.where(nb - 1 >= 2, c_loo, float("inf"))
        c_loo = tl.minimum(tl.max(tl.where(gm[:, None], c_loo, float("-inf")), 0), lim)
        pi = 1 - (1 - pa) * (1 - tl.minimum(c_loo * pr, 1.0))
        tl.store(logw_out + bh * W + w, -tl.log(tl.maximum(pi, 1e-30)), mask=w < W)


@triton.jit
def _chi2_factor(n, ZA):
    """reference.sigma_upper_factor(n, alpha) squared (ZA = its normal quantile)."""
    k = tl.maximum(n - 1, 1.0)
    c = 1 - 2 / (9 * k) + ZA * tl.sqrt(2 / (9 * k))
    return k / tl.maximum(k * c * c * c, 1e-3)


@triton.jit
def _finish_kernel(m_f, l_f, acc_f, m_b, l_b, acc_b, m_s, l_s, acc_s, m, d_f, out, d_hat_out,
                   N, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """G of the N = B * Hq query heads: merge the three partials and D_hat (reference.finish).
    Per-head tensors [N], acc and out [N, D]."""
    g, d = tl.arange(0, G), tl.arange(0, DP)
    h = tl.program_id(0).to(tl.int64) * G + g
    gm = h < N
    gd = gm[:, None] & (d < D)[None, :]
    mf = tl.load(m_f + h, mask=gm, other=0.0)  # padding heads: finite, unused
    mb = tl.load(m_b + h, mask=gm, other=float("-inf"))
    ms = tl.load(m_s + h, mask=gm, other=float("-inf"))
    lf = tl.load(l_f + h, mask=gm, other=1.0)
    lb = tl.load(l_b + h, mask=gm, other=0.0)
    ls = tl.load(l_s + h, mask=gm, other=0.0)
    top = tl.maximum(tl.maximum(tl.maximum(mf, mb), ms), -3.4028234663852886e38)
    cf, cb, cs = tl.exp(mf - top), tl.exp(mb - top), tl.exp(ms - top)
    o = tl.load(acc_f + h[:, None] * D + d[None, :], mask=gd, other=0.0) * cf[:, None]
    o += tl.load(acc_b + h[:, None] * D + d[None, :], mask=gd, other=0.0) * cb[:, None]
    o += tl.load(acc_s + h[:, None] * D + d[None, :], mask=gd, other=0.0) * cs[:, None]
    tl.store(out + h[:, None] * D + d[None, :], o / (lf * cf + lb * cb + ls * cs)[:, None],
             mask=gd)
    mh = tl.load(m + h, mask=gm, other=0.0)
    d_hat = tl.load(d_f + h, mask=gm, other=1.0) + lb * tl.exp(mb - mh) + ls * tl.exp(ms - mh)
    tl.store(d_hat_out + h, d_hat, mask=gm)


# TRITON_INTERPRET=1 (read when the kernels were decorated) runs them in the CPU interpreter
_INTERPRET = not isinstance(_attn_kernel, triton.runtime.jit.JITFunction)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(q, pool, block_tables, rows, counts) -> None:
    assert q.dim() == 3 and pool.dim() == 4 and pool.stride(-1) == 1, "pool [pages, Hkv, P, D]"
    assert q.dtype in _DTYPES and pool.dtype in _DTYPES and not rows.is_floating_point()
    assert block_tables.stride(1) == 1 and rows.stride(2) == 1 and counts.is_contiguous()
    assert q.device == pool.device == rows.device and pool.shape[1] == rows.shape[1]


def store_rows(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, planes: torch.Tensor,
               k_pool: torch.Tensor, v_pool: torch.Tensor, sig: torch.Tensor,
               resident: tuple | None = None) -> None:
    """One kernel for a step's writes: K/V rows [T, Hkv, D] at flat slots [T] into one layer's
    pools (GPU memory or UVA views of pinned host memory), into the GPU copies of their pages
    (resident: ResidentPages.layer), and their signatures into sig."""
    T, Hkv, D = k.shape
    nbits = planes.shape[-1]
    assert k.stride(-1) == v.stride(-1) == 1 and planes.is_contiguous() and sig.stride(-1) == 1
    assert k_pool.stride(-1) == v_pool.stride(-1) == 1 and planes.dtype == torch.float32
    slot_of, k_hot, v_hot = _resident(resident, k_pool, v_pool)
    BLOCK = 16
    _store_kernel[(triton.cdiv(T, BLOCK), Hkv)](
        k, v, slots.contiguous(), planes, k_pool, v_pool, sig, slot_of, k_hot, v_hot, T,
        *k.stride()[:2], *v.stride()[:2], *k_pool.stride()[:3], *v_pool.stride()[:3],
        *sig.stride()[:3], k_pool.shape[2], D, _p2(D), nbits, _p2(nbits, 8), BLOCK,
        resident is not None, _INTERPRET)


def _resident(resident, k_pool: torch.Tensor, v_pool: torch.Tensor):
    """(slot_of, k_hot, v_hot), checked to share the pools' strides; dummies when None."""
    if resident is None:
        return k_pool, k_pool, v_pool  # never read (HOT False)
    slot_of, k_hot, v_hot = resident
    assert slot_of.dtype == torch.int32 and k_hot.stride() == k_pool.stride()
    assert v_hot.stride() == v_pool.stride() and k_hot.dtype == k_pool.dtype
    return resident


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


def _select(mode: int, picked, context_lens, sink: int, window: int, width: int, S: int,
            u=None, prop=None, size=None, c=None):
    """Row lists [B, Hkv, width] and counts [B, Hkv] (see _rows_kernel), and the lists beside."""
    assert picked.dtype == torch.int8 and picked.stride(-1) == 1 and picked.shape[-1] >= S
    B, Hkv, dev = len(context_lens), picked.shape[1], context_lens.device
    n_splits = max(1, triton.cdiv(S, SPLIT))
    counts = torch.empty(B, Hkv, n_splits, dtype=torch.int32, device=dev)
    total = torch.empty(B, Hkv, dtype=torch.long, device=dev)
    rows = torch.empty(B, Hkv, width, dtype=torch.long, device=dev)
    aux = [torch.empty(B, Hkv, width, dtype=torch.float32, device=dev)
           for _ in range((0, 2, 1)[mode])]  # pilot: pa, pr; second sample: log weights
    dummy = counts
    head = [dummy] * 6  # scores, inv_t, lse, n_r, size, c
    if mode:
        assert u.is_contiguous() and u.shape == (2, B, Hkv, S)
        head = [x.float().contiguous() for x in (*prop, size, c if c is not None else size)]
    for write in (False, True):
        _rows_kernel[(B * Hkv, n_splits)](
            picked, head[0], u if mode else dummy, *head[1:], context_lens, counts, total, rows,
            *(aux + [dummy, dummy])[:2], width, S, B * Hkv, picked.stride(1), sink, window,
            PROPOSAL_FLOOR, Hkv, mode, write, SPLIT, BLOCK_SEL, _p2(n_splits, 1))
    return rows, total, *aux


def exact_rows(picked, context_lens, S: int, sink: int, window: int, width: int):
    """Row lists [B, Hkv, width] of sink, window and picked rows, counts [B, Hkv] (reference)."""
    return _select(0, picked, context_lens, sink, window, width, S)


def pilot_rows(picked, u, prop, size, context_lens, sink: int, window: int, width: int):
    """The pilot's lists, counts, pa and pr (reference.pilot_rows)."""
    return _select(1, picked, context_lens, sink, window, width, u.shape[-1], u, prop, size)


def second_rows(picked, u, prop, size, c, context_lens, sink: int, window: int, width: int):
    """The second sample's lists, counts and log weights (reference.second_rows)."""
    return _select(2, picked, context_lens, sink, window, width, u.shape[-1], u, prop, size, c)


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


def proposal_params(scores: torch.Tensor, picked: torch.Tensor):
    """inv_t and lse [B, Hkv] of the residual's hash scores (reference.proposal_params): two
    passes over splits of the positions, then one program per head combines the splits."""
    B, Hkv, S = scores.shape
    assert scores.is_contiguous()
    n_splits = max(1, triton.cdiv(S, SPLIT))
    dev = scores.device
    stats1 = torch.empty(B * Hkv, n_splits, 3, dtype=torch.float32, device=dev)
    stats2 = torch.empty(B * Hkv, n_splits, 2, dtype=torch.float32, device=dev)
    inv_t, lse = (torch.empty(B, Hkv, dtype=torch.float32, device=dev) for _ in range(2))
    for step in (1, 2):
        _proposal_kernel[(B * Hkv, n_splits)](
            scores, picked, stats1, stats2, inv_t, S, picked.stride(1), PROPOSAL_TEMPERATURE,
            SPLIT, BLOCK_SEL, _p2(n_splits, 1), step)
    _lse_kernel[(B * Hkv,)](stats2, lse, n_splits, _p2(n_splits, 1))
    return inv_t, lse


def pilot_budget(s_b, count_b, pa_b, pr_b, m_f, l_f, cap, n_r, epsilon: float, delta: float):
    """The second sample's size from the pilot, one program per group (reference.pilot_budget)."""
    B, Hq, W = s_b.shape
    Hkv = count_b.shape[1]
    G = Hq // Hkv
    dev = s_b.device
    m, d_f, over = (torch.empty(B, Hq, dtype=torch.float32, device=dev) for _ in range(3))
    c = torch.empty(B, Hkv, dtype=torch.float32, device=dev)
    logw = torch.empty(B, Hkv, W, dtype=torch.float32, device=dev)
    _budget_kernel[(B * Hkv,)](
        s_b.contiguous(), count_b.contiguous(), pa_b.contiguous(), pr_b.contiguous(),
        m_f.contiguous(), l_f.contiguous(), cap.float().contiguous(), n_r.float().contiguous(), m,
        d_f, c, logw, over, W, sample_z(delta), NormalDist().inv_cdf(delta / 2), epsilon,
        PROPOSAL_FLOOR, G, _p2(G, 1), 256)
    return m, d_f, c, logw, over


def finish(part_f, part_b, part_s, m, d_f):
    """Output and D_hat from the three partials (reference.finish)."""
    B, Hq, D = part_f[2].shape
    G = 4  # query heads per program
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=m.device)
    d_hat = torch.empty_like(m)
    c = [t.contiguous() for part in (part_f, part_b, part_s) for t in part]
    _finish_kernel[(triton.cdiv(B * Hq, G),)](*c, m.contiguous(), d_f.contiguous(), out, d_hat,
                                              B * Hq, G, D, _p2(D, 1))
    return out, d_hat


def row_scores(q: torch.Tensor, k_pool: torch.Tensor, block_tables: torch.Tensor,
               rows: torch.Tensor, counts: torch.Tensor, scale: float,
               resident: tuple | None = None) -> torch.Tensor:
    """Scores q . k * scale of the listed rows: [B, Hq, R] f32, -inf past counts [B, Hkv].
    resident (ResidentPages.layer): rows of pages with a GPU copy are read from the copy."""
    _check(q, k_pool, block_tables, rows, counts)
    B, Hq, D = q.shape
    Hkv, R = rows.shape[1:]
    out = torch.empty(B, Hq, R, dtype=torch.float32, device=q.device)
    if R == 0:
        return out
    G, P = Hq // Hkv, k_pool.shape[2]
    slot_of, k_hot, _ = _resident(resident, k_pool, k_pool)
    _row_kernel[(B * Hkv, triton.cdiv(R, BLOCK_R))](
        q.contiguous(), k_pool, k_hot, slot_of, block_tables, rows, counts, out, scale, R,
        block_tables.stride(0), rows.stride(0), rows.stride(1), *k_pool.stride()[:3], Hkv, G, P,
        D, _p2(G), _p2(D), BLOCK_R, resident is not None, _INTERPRET)
    return out


def partial_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      block_tables: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                      logw: torch.Tensor | None, scale: float, resident: tuple | None = None,
                      scores: torch.Tensor | None = None,
                      chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised softmax attention over the listed rows, scores biased by logw [B, Hkv, R];
    rows of pages with a GPU copy (resident: ResidentPages.layer) are read from the copy; given
    scores (row_scores of the same rows), K is not read.

    Returns m [B, Hq], l [B, Hq], acc [B, Hq, D] (f32; see reference.partial_attention). Each of
    cdiv(R, chunk) splits per (sequence, KV head) handles chunk consecutive list entries.
    """
    _check(q, k_pool, block_tables, rows, counts)
    assert v_pool.shape == k_pool.shape and v_pool.dtype == k_pool.dtype and v_pool.stride(-1) == 1
    assert chunk >= 16 and chunk & (chunk - 1) == 0, "chunk: a power of two >= 16"
    B, Hq, D = q.shape
    Hkv, R = rows.shape[1:]
    G, P = Hq // Hkv, k_pool.shape[2]
    n_splits = max(1, triton.cdiv(R, chunk))
    dev = q.device
    m = torch.empty(B, Hq, n_splits, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hq, n_splits, D, dtype=torch.float32, device=dev)
    w = logw if logw is not None else m  # a dummy pointer when HAS_W is False
    sw = logw.stride() if logw is not None else (0, 0, 0)
    slot_of, k_hot, v_hot = _resident(resident, k_pool, v_pool)
    _attn_kernel[(B * Hkv, n_splits)](
        q.contiguous(), k_pool, v_pool, k_hot, v_hot, slot_of, block_tables, rows, counts, w,
        scores if scores is not None else m, m, l, acc, scale, R,
        block_tables.stride(0), rows.stride(0), rows.stride(1), *sw, *k_pool.stride()[:3],
        *v_pool.stride()[:3], Hkv, G, P, D, _p2(G), _p2(D), min(BLOCK_R, chunk), chunk,
        logw is not None, scores is not None, resident is not None, _INTERPRET)
    if n_splits == 1:
        return m[..., 0], l[..., 0], acc[..., 0, :]
    m_all, l_all = torch.empty(B, Hq, dtype=torch.float32, device=dev), torch.empty_like(m[..., 0])
    acc_all = torch.empty(B, Hq, D, dtype=torch.float32, device=dev)
    _combine_kernel[(B * Hq,)](m, l, acc, m_all, l_all, acc_all, n_splits, D, _p2(n_splits, 1),
                               _p2(D, 1))
    return m_all, l_all, acc_all
