"""The fetch: exact scores and softmax attention over listed K/V rows, the only kernels that read
the pool (over PCIe where it is pinned host memory).

Long row lists are split over programs flash-decoding style: each split writes unnormalised
online-softmax partials and a second kernel combines the splits. The number of splits comes from
the padded row-buffer width R (a host int), so no host sync on the counts is needed; splits past a
list's count are empty.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vengine.kernels.triton.common import (_INTERPRET, _check, _load_q, _load_rows, _mma, _p2,
                                           _resident, _row_scale, _soft_cap, _unpack)

CHUNK = 256  # rows per partial_attention program (one flash-decoding split)
BLOCK_R = 64  # rows per inner step
COMBINE_SPLITS = 16  # splits per step of the combine


@triton.jit
def _row_kernel(q, k_pool, k_hot, slot_of, k_scale, tables, rows, counts, out, scale, cap, R,
                st0, sr0, sr1, sk0, sk1, sk2, HKV: tl.constexpr, G: tl.constexpr,
                P: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr,
                BLOCK: tl.constexpr, HOT: tl.constexpr, FP8: tl.constexpr, CAP: tl.constexpr,
                INTERPRET: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // HKV, bh % HKV
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = i < tl.load(counts + bh)
    row_ptr = rows + b * sr0 + h * sr1 + i
    k = _load_rows(k_pool, k_hot, slot_of, tables, row_ptr, live, b, h, st0, sk0, sk1, sk2, P, D,
                   DP, HOT)
    qt = _load_q(q, bh, G, D, GP, DP)
    if FP8:  # e4m3 rows: the dot over their values, then each row's scale
        s = _mma(qt, tl.trans(k.to(tl.float32)), INTERPRET)
        s *= _row_scale(k_scale, tables, row_ptr, live, b, h, st0, HKV, P)[None, :]
    else:
        s = _mma(qt, tl.trans(k), INTERPRET)
    s = _soft_cap(s * scale, cap, CAP)
    s = tl.where(live[None, :], s, float("-inf"))  # [GP, BLOCK]
    g = tl.arange(0, GP)
    tl.store(out + (bh * G + g[:, None]) * R + i[None, :], s,
             mask=(g[:, None] < G) & (i[None, :] < R))


@triton.jit
def _attn_kernel(q, k_pool, v_pool, k_hot, v_hot, slot_of, k_scale, v_scale, tables, rows,
                 counts, logw, scores, src, k_held, v_held, k_new, v_new, m_out, l_out, acc_out,
                 scale, cap, R, W, st0, sr0, sr1, sw0, sw1, sw2, sk0, sk1, sk2, sv0, sv1, sv2,
                 HKV: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                 GP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, CHUNK_: tl.constexpr,
                 HAS_W: tl.constexpr, HAS_S: tl.constexpr, HOT: tl.constexpr, FP8: tl.constexpr,
                 CAP: tl.constexpr, CACHED: tl.constexpr, INTERPRET: tl.constexpr):
    """With CACHED (base.Cached, src [B*Hkv, R], held/new [B*Hkv, W, D] contiguous): a row with
    src >= 0 is read from k_held/v_held, the others from the pool (over PCIe), and every live
    row is written to k_new/v_new at its list index."""
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
        fetch = live
        if CACHED:
            j = tl.load(src + bh * R + i, mask=live, other=-1).to(tl.int64)
            hit = j >= 0
            fetch = live & ~hit
            d = tl.arange(0, DP)
            at_held = (bh * W + j)[:, None] * D + d[None, :]
            at_new = (bh * W + i)[:, None] * D + d[None, :]
            held = hit[:, None] & (d[None, :] < D)
            put = live[:, None] & (d[None, :] < D)
        if HAS_S:  # the rows' scores are known (row_scores): K is not read again
            g = tl.arange(0, GP)
            s = tl.load(scores + (bh * G + g[:, None]) * R + i[None, :],
                        mask=(g[:, None] < G) & live[None, :], other=float("-inf"))
        else:
            k = _load_rows(k_pool, k_hot, slot_of, tables, row_ptr, fetch, b, h, st0, sk0, sk1,
                           sk2, P, D, DP, HOT)
            if CACHED:
                k = tl.where(held, tl.load(k_held + at_held, mask=held, other=0.0), k)
                tl.store(k_new + at_new, k, mask=put)
            if FP8:  # as in _row_kernel
                s = _mma(qt, tl.trans(k.to(tl.float32)), INTERPRET)
                s *= _row_scale(k_scale, tables, row_ptr, live, b, h, st0, HKV, P)[None, :]
            else:
                s = _mma(qt, tl.trans(k), INTERPRET)
            s = _soft_cap(s * scale, cap, CAP)  # [GP, BLOCK]
        if HAS_W:
            w = tl.load(logw + b * sw0 + h * sw1 + i * sw2, mask=live, other=0.0)
            s += w.to(tl.float32)[None, :]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = _load_rows(v_pool, v_hot, slot_of, tables, row_ptr, fetch, b, h, st0, sv0, sv1, sv2,
                       P, D, DP, HOT)
        if CACHED:
            v = tl.where(held, tl.load(v_held + at_held, mask=held, other=0.0), v)
            tl.store(v_new + at_new, v, mask=put)
        l = l * alpha + tl.sum(p, axis=1)
        if FP8:  # each V row's scale on its weight
            pv = p * _row_scale(v_scale, tables, row_ptr, live, b, h, st0, HKV, P)[None, :]
            acc = acc * alpha[:, None] + _mma(pv, v.to(tl.float32), INTERPRET)
        else:
            acc = acc * alpha[:, None] + _mma(p, v, INTERPRET)
        m = m_new
    g, d = tl.arange(0, GP), tl.arange(0, DP)
    slot = (bh * G + g) * n_splits + split  # [B, Hq, n_splits] scratch
    tl.store(m_out + slot, m, mask=g < G)
    tl.store(l_out + slot, l, mask=g < G)
    tl.store(acc_out + slot[:, None] * D + d[None, :], acc,
             mask=(g[:, None] < G) & (d[None, :] < D))


@triton.jit
def _combine_kernel(m, l, acc, counts, m_out, l_out, acc_out, NS, CHUNK_: tl.constexpr,
                    G: tl.constexpr, D: tl.constexpr, NT: tl.constexpr, DP: tl.constexpr):
    """One query head: its live splits' partials (the cdiv(count, CHUNK_) splits that hold its
    rows) rescaled to their common max, NT splits at a time. Why only the live ones: a row
    buffer as wide as the context (the second sample's, whose size only the device knows) has
    512 splits at 128K, nearly all empty, and reading them all took 36 us per call."""
    i = tl.program_id(0).to(tl.int64)  # b * Hq + query head: its KV head's list is i // G
    n_live = tl.minimum(tl.cdiv(tl.load(counts + i // G), CHUNK_), NS)  # counts <= R anyway
    d = tl.arange(0, DP)
    top = tl.full([], float("-inf"), tl.float32)
    l_sum = tl.zeros([], tl.float32)
    a_sum = tl.zeros([DP], tl.float32)
    for j0 in range(0, n_live, NT):
        j = j0 + tl.arange(0, NT)
        live = j < n_live
        ms = tl.load(m + i * NS + j, mask=live, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(ms, 0))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # no rows yet: c, alpha = 0
        alpha, c = tl.exp(top - safe), tl.exp(ms - safe)
        a = tl.load(acc + (i * NS + j[:, None]) * D + d[None, :],
                    mask=live[:, None] & (d[None, :] < D), other=0.0)
        l_sum = l_sum * alpha + tl.sum(tl.load(l + i * NS + j, mask=live, other=0.0) * c, 0)
        a_sum = a_sum * alpha + tl.sum(a * c[:, None], 0)
        top = new_top
    tl.store(m_out + i, top)
    tl.store(l_out + i, l_sum)
    tl.store(acc_out + i * D + d, a_sum, mask=d < D)


def _cached(cache, pool: torch.Tensor, rows: torch.Tensor, scores) -> tuple:
    """base.Cached checked for the kernel (src [B, Hkv, R], the rest [B, Hkv, W, D] with rows
    contiguous per (sequence, KV head)); dummies when None."""
    if cache is None:
        return (rows,) + (pool,) * 4  # never read (CACHED False)
    assert scores is None, "a row cache holds K and V: the list's K is read"
    src, *held = cache
    assert src.shape == rows.shape and src.dtype == torch.int32 and src.is_contiguous()
    B, Hkv, W, D = held[0].shape
    for x in held:
        assert x.shape == held[0].shape and x.dtype == pool.dtype and W >= rows.shape[2]
        assert x.stride()[1:] == (W * D, D, 1) and x.stride(0) == Hkv * W * D
    return cache


def row_scores(q: torch.Tensor, k_pool: torch.Tensor, block_tables: torch.Tensor,
               rows: torch.Tensor, counts: torch.Tensor, scale: float,
               resident: tuple | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Scores q . k * scale of the listed rows (soft-capped where softcap is set): [B, Hq, R]
    f32, -inf past counts [B, Hkv]. resident (ResidentPages.layer): rows of pages with a GPU
    copy are read from the copy."""
    k_pool, k_scale, fp8 = _unpack(k_pool)
    _check(q, k_pool, block_tables, rows, counts)
    B, Hq, D = q.shape
    Hkv, R = rows.shape[1:]
    out = torch.empty(B, Hq, R, dtype=torch.float32, device=q.device)
    if R == 0:
        return out
    G, P = Hq // Hkv, k_pool.shape[2]
    slot_of, k_hot, _ = _resident(resident, k_pool, k_pool)
    _row_kernel[(B * Hkv, triton.cdiv(R, BLOCK_R))](
        q.contiguous(), k_pool, k_hot, slot_of, k_scale, block_tables, rows, counts, out, scale,
        softcap or 1.0, R, block_tables.stride(0), rows.stride(0), rows.stride(1),
        *k_pool.stride()[:3], Hkv, G, P, D, _p2(G), _p2(D), BLOCK_R, resident is not None, fp8,
        bool(softcap), _INTERPRET)
    return out


def partial_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      block_tables: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                      logw: torch.Tensor | None, scale: float, resident: tuple | None = None,
                      scores: torch.Tensor | None = None, softcap: float = 0.0,
                      cache: tuple | None = None, chunk: int = CHUNK
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised softmax attention over the listed rows, scores biased by logw [B, Hkv, R];
    rows of pages with a GPU copy (resident: ResidentPages.layer) are read from the copy; given
    scores (row_scores of the same rows), K is not read; cache (base.Cached): rows held from the
    step before are read from there, and the list's rows written beside.

    Returns m [B, Hq], l [B, Hq], acc [B, Hq, D] (f32; see reference.partial_attention). Each of
    cdiv(R, chunk) splits per (sequence, KV head) handles chunk consecutive list entries.
    """
    (k_pool, k_scale, fp8), (v_pool, v_scale, _) = _unpack(k_pool), _unpack(v_pool)
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
    src, k_held, v_held, k_new, v_new = _cached(cache, k_pool, rows, scores)
    _attn_kernel[(B * Hkv, n_splits)](
        q.contiguous(), k_pool, v_pool, k_hot, v_hot, slot_of, k_scale, v_scale, block_tables,
        rows, counts, w, scores if scores is not None else m, src, k_held, v_held, k_new, v_new,
        m, l, acc, scale, softcap or 1.0, R, k_held.shape[2] if cache else 0,
        block_tables.stride(0), rows.stride(0), rows.stride(1), *sw, *k_pool.stride()[:3],
        *v_pool.stride()[:3], Hkv, G, P, D, _p2(G), _p2(D), min(BLOCK_R, chunk), chunk,
        logw is not None, scores is not None, resident is not None, fp8, bool(softcap),
        cache is not None, _INTERPRET)
    if n_splits == 1:
        return m[..., 0], l[..., 0], acc[..., 0, :]
    m_all, l_all = torch.empty(B, Hq, dtype=torch.float32, device=dev), torch.empty_like(m[..., 0])
    acc_all = torch.empty(B, Hq, D, dtype=torch.float32, device=dev)
    _combine_kernel[(B * Hq,)](m, l, acc, counts, m_all, l_all, acc_all, n_splits, chunk, G, D,
                               COMBINE_SPLITS, _p2(D, 1))
    return m_all, l_all, acc_all
