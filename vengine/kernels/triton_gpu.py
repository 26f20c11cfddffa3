"""Triton GPU kernels for vAttention decode; same interface as vengine.kernels.reference.

Why: on the GPU the K/V pool may live in pinned host memory read through a UVA view
(vengine.offload.uva), so every byte a kernel reads is PCIe traffic. Each program therefore owns
one (sequence, KV head) and reads each selected K/V row once for all G = Hq / Hkv query heads of
the GQA group (the group is padded to >= 16 rows so tl.dot applies). Row lists are sorted ascending by construction
(vattention.compact), which keeps the reads sequential-ish. Long row lists are split over
programs flash-decoding style: each split writes unnormalised online-softmax partials and the
splits are combined in torch. The number of splits comes from the padded row-buffer width R (a
host int), so no host sync on the counts is needed; splits past a list's count are empty.

Inputs may be float32, bfloat16 or float16; outputs are float32. The dots run on tensor cores
to about float32 accuracy (_mma): decode is bound by memory (or PCIe), not by these few MMAs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vengine.kernels.reference import byte_signs, pack_signatures  # noqa: F401  (re-export)

CHUNK = 256  # rows per partial_attention program (one flash-decoding split)
BLOCK_R = 64  # rows per inner step
BLOCK_S = 64  # signatures per hash_scores program


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@triton.jit
def _hash_kernel(table, sig, out, S, G: tl.constexpr, NB: tl.constexpr, GP: tl.constexpr,
                 NBP: tl.constexpr, BLOCK: tl.constexpr):
    # table [B*Hkv, G, NB, 256] f32, sig [B*Hkv, S, NB] u8, out [B*Hkv, G, S] f32 (all contiguous)
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g, j = tl.arange(0, GP), tl.arange(0, NBP)
    s_ok, j_ok = s < S, j < NB
    byte = tl.load(sig + (bh * S + s[:, None]) * NB + j[None, :],
                   mask=s_ok[:, None] & j_ok[None, :], other=0).to(tl.int32)  # [BLOCK, NBP]
    offs = (g[:, None, None] * NB + j[None, None, :]) * 256 + byte[None, :, :]  # [GP, BLOCK, NBP]
    mask = (g[:, None, None] < G) & j_ok[None, None, :]
    vals = tl.load(table + bh * (G * NB * 256) + offs, mask=mask, other=0.0)
    tl.store(out + (bh * G + g[:, None]) * S + s[None, :], tl.sum(vals, axis=2),
             mask=(g[:, None] < G) & s_ok[None, :])


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
def _load_rows(pool, tables, row_ptr, live, b, h, st0, s0, s1, s2,
               P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Rows [BLOCK_R, DP] of pool [pages, Hkv, P, D] at token positions row_ptr (0 if dead)."""
    r = tl.load(row_ptr, mask=live, other=0)
    page = tl.load(tables + b * st0 + r // P, mask=live, other=0).to(tl.int64)
    d = tl.arange(0, DP)
    ptr = pool + page * s0 + h * s1 + (r % P) * s2
    return tl.load(ptr[:, None] + d[None, :], mask=live[:, None] & (d[None, :] < D),
                   other=0.0)


@triton.jit
def _row_kernel(q, k_pool, tables, rows, counts, out, scale, R, st0, sr0, sr1, sk0, sk1, sk2,
                HKV: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                GP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // HKV, bh % HKV
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = i < tl.load(counts + bh)
    k = _load_rows(k_pool, tables, rows + b * sr0 + h * sr1 + i, live, b, h, st0, sk0, sk1, sk2,
                   P, D, DP)
    s = _mma(_load_q(q, bh, G, D, GP, DP), tl.trans(k), INTERPRET) * scale
    s = tl.where(live[None, :], s, float("-inf"))  # [GP, BLOCK]
    g = tl.arange(0, GP)
    tl.store(out + (bh * G + g[:, None]) * R + i[None, :], s,
             mask=(g[:, None] < G) & (i[None, :] < R))


@triton.jit
def _attn_kernel(q, k_pool, v_pool, tables, rows, counts, logw, m_out, l_out, acc_out, scale,
                 st0, sr0, sr1, sw0, sw1, sw2, sk0, sk1, sk2, sv0, sv1, sv2,
                 HKV: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                 GP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, CHUNK_: tl.constexpr,
                 HAS_W: tl.constexpr, INTERPRET: tl.constexpr):
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
        k = _load_rows(k_pool, tables, row_ptr, live, b, h, st0, sk0, sk1, sk2, P, D, DP)
        s = _mma(qt, tl.trans(k), INTERPRET) * scale  # [GP, BLOCK]
        if HAS_W:
            w = tl.load(logw + b * sw0 + h * sw1 + i * sw2, mask=live, other=0.0)
            s += w.to(tl.float32)[None, :]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = _load_rows(v_pool, tables, row_ptr, live, b, h, st0, sv0, sv1, sv2, P, D, DP)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mma(p, v, INTERPRET)
        m = m_new
    g, d = tl.arange(0, GP), tl.arange(0, DP)
    slot = (bh * G + g) * n_splits + split  # [B, Hq, n_splits] scratch
    tl.store(m_out + slot, m, mask=g < G)
    tl.store(l_out + slot, l, mask=g < G)
    tl.store(acc_out + slot[:, None] * D + d[None, :], acc,
             mask=(g[:, None] < G) & (d[None, :] < D))


# TRITON_INTERPRET=1 (read when the kernels were decorated) runs them in the CPU interpreter
_INTERPRET = not isinstance(_attn_kernel, triton.runtime.jit.JITFunction)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(q, pool, block_tables, rows, counts) -> None:
    assert q.dim() == 3 and pool.dim() == 4 and pool.stride(-1) == 1, "pool [pages, Hkv, P, D]"
    assert q.dtype in _DTYPES and pool.dtype in _DTYPES and not rows.is_floating_point()
    assert block_tables.stride(1) == 1 and rows.stride(2) == 1 and counts.is_contiguous()
    assert q.device == pool.device == rows.device and pool.shape[1] == rows.shape[1]


def hash_scores(q: torch.Tensor, planes: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D], planes [Hkv, D, nbits], sig [B, Hkv, S, nbytes] uint8 -> [B, Hq, S] f32."""
    B, Hq, D = q.shape
    _, Hkv, S, nbytes = sig.shape
    G = Hq // Hkv
    assert sig.dtype == torch.uint8 and planes.shape == (Hkv, D, 8 * nbytes)
    w = torch.einsum("bhgd,hdn->bhgn", q.float().view(B, Hkv, G, D), planes.float())
    table = (w.view(B, Hkv, G, nbytes, 8) @ byte_signs(q.device).T).contiguous()
    out = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    grid = (B * Hkv, triton.cdiv(S, BLOCK_S))
    _hash_kernel[grid](table, sig.contiguous(), out, S, G, nbytes, _p2(G, 1), _p2(nbytes, 1),
                       BLOCK_S)
    return out


def row_scores(q: torch.Tensor, k_pool: torch.Tensor, block_tables: torch.Tensor,
               rows: torch.Tensor, counts: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores q . k * scale of the listed rows: [B, Hq, R] f32, -inf past counts [B, Hkv]."""
    _check(q, k_pool, block_tables, rows, counts)
    B, Hq, D = q.shape
    Hkv, R = rows.shape[1:]
    out = torch.empty(B, Hq, R, dtype=torch.float32, device=q.device)
    if R == 0:
        return out
    G, P = Hq // Hkv, k_pool.shape[2]
    _row_kernel[(B * Hkv, triton.cdiv(R, BLOCK_R))](
        q.contiguous(), k_pool, block_tables, rows, counts, out, scale, R, block_tables.stride(0),
        rows.stride(0), rows.stride(1), *k_pool.stride()[:3], Hkv, G, P, D, _p2(G), _p2(D),
        BLOCK_R, _INTERPRET)
    return out


def partial_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      block_tables: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                      logw: torch.Tensor | None, scale: float, chunk: int = CHUNK
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised softmax attention over the listed rows, scores biased by logw [B, Hkv, R].

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
    _attn_kernel[(B * Hkv, n_splits)](
        q.contiguous(), k_pool, v_pool, block_tables, rows, counts, w, m, l, acc, scale,
        block_tables.stride(0), rows.stride(0), rows.stride(1), *sw, *k_pool.stride()[:3],
        *v_pool.stride()[:3], Hkv, G, P, D, _p2(G), _p2(D), min(BLOCK_R, chunk), chunk,
        logw is not None, _INTERPRET)
    if n_splits == 1:
        return m[..., 0], l[..., 0], acc[..., 0, :]
    m_all = m.amax(-1)  # combine the splits: rescale each to the common max
    c = torch.exp(m - m_all.clamp_min(torch.finfo(torch.float32).min)[..., None])
    return m_all, (l * c).sum(-1), (acc * c[..., None]).sum(-2)
