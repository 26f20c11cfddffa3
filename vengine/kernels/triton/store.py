"""store_rows: a step's K/V rows written straight into the pools (GPU memory or UVA views of pinned
host memory) and into their pages' GPU copies, then the key codes of each page the step filled.
Prefill and decode write through it; exact attention, which keeps no codes, too (codes None)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vengine.kernels.triton.common import _fp8_quantise, _p2, _resident, _unpack


@triton.jit
def _store_kernel(k, v, slots, k_pool, v_pool, slot_of, k_hot, v_hot, k_scale, v_scale, T, sk0,
                  sk1, sv0, sv1, pk0, pk1, pk2, pv0, pv1, pv2, HKV: tl.constexpr,
                  P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                  HOT: tl.constexpr, FP8: tl.constexpr):
    """BLOCK tokens of one KV head: K/V rows to the pools (and to their pages' GPU copies, if
    any: HOT, the pools' strides); with FP8, quantised per row (_fp8_quantise), the scales to
    k_scale, v_scale [pages, Hkv, P]."""
    h = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, DP)
    ok = t < T
    okd = ok[:, None] & (d < D)[None, :]
    slot = tl.load(slots + t, mask=ok, other=0).to(tl.int64)
    page, off = slot // P, slot % P
    kx = tl.load(k + t[:, None] * sk0 + h * sk1 + d[None, :], mask=okd, other=0.0)
    vx = tl.load(v + t[:, None] * sv0 + h * sv1 + d[None, :], mask=okd, other=0.0)
    if FP8:
        kx, ks = _fp8_quantise(kx)
        vx, vs = _fp8_quantise(vx)
        tl.store(k_scale + (page * HKV + h) * P + off, ks.to(tl.bfloat16), mask=ok)
        tl.store(v_scale + (page * HKV + h) * P + off, vs.to(tl.bfloat16), mask=ok)
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


@triton.jit
def _encode_kernel(k, slots, k_pool, k_scale, codes, scales, sk0, sk1, pk0, pk1, pk2, c0, c1, c2,
                   s0, s1, s2, HKV: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                   PP: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr,
                   LEVELS: tl.constexpr, FP8: tl.constexpr):
    """One token and KV head: if its slot is its page's last row, the page's codes and scales
    (common.encode_pages; LEVELS = 2^BITS - 1) of its keys as stored (FP8: dequantised). The
    rows come from k where the P tokens up to this one are the page's rows in order (a prefill
    chunk: no read back over PCIe), else from the pool."""
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    slot = tl.load(slots + t).to(tl.int64)
    if slot % P != P - 1:
        return
    page = slot // P
    r, d = tl.arange(0, PP), tl.arange(0, DP)
    rok = r < P
    ok = rok[:, None] & (d < D)[None, :]
    src = t - (P - 1) + r  # the tokens that would hold the page's rows 0..P-1
    mine = tl.load(slots + src, mask=rok & (src >= 0), other=-1) == page * P + r
    from_k = tl.sum(mine.to(tl.int32), 0) == P
    x_k = tl.load(k + src[:, None] * sk0 + h * sk1 + d[None, :],
                  mask=tl.where(from_k, ok, False), other=0.0)
    x_pool = tl.load(k_pool + page * pk0 + h * pk1 + r[:, None] * pk2 + d[None, :],
                     mask=tl.where(from_k, False, ok), other=0.0)
    if FP8:  # the rows as _store_kernel stored them: values times their scales
        xq, xs = _fp8_quantise(x_k)
        x_k = xq.to(k_pool.dtype.element_ty).to(tl.float32) * xs[:, None]
        ps = tl.load(k_scale + (page * HKV + h) * P + r, mask=rok, other=0.0).to(tl.float32)
        x = tl.where(from_k, x_k, x_pool.to(tl.float32) * ps[:, None])
    else:
        x = tl.where(from_k, x_k.to(k_pool.dtype.element_ty), x_pool).to(tl.float32)  # stored
    lo = tl.min(tl.where(ok, x, float("inf")), 0).to(tl.float16).to(tl.float32)
    hi = tl.max(tl.where(ok, x, float("-inf")), 0)
    # div_rn: IEEE division, so that the codes and scales are encode_pages' bit for bit
    step = tl.math.div_rn(hi - lo, tl.full([DP], LEVELS, tl.float32))
    step = step.to(tl.float16).to(tl.float32)
    level = tl.floor(tl.math.div_rn(x - lo[None, :], tl.maximum(step, 1e-30)[None, :]) + 0.5)
    level = tl.where(step[None, :] > 0, tl.minimum(tl.maximum(level, 0.0), LEVELS), 0.0)
    code = level.to(tl.int32)
    base = scales + page * s0 + h * s1 + d
    tl.store(base, lo.to(tl.float16), mask=d < D)
    tl.store(base + s2, step.to(tl.float16), mask=d < D)
    nb = tl.arange(0, DP // 8)
    row = codes + page * c0 + h * c1 + r[:, None] * c2 + nb[None, :]
    for j in tl.static_range(BITS):  # bit plane j: byte j * D / 8 + c // 8, bit c % 8
        bit = ((code >> j) & 1) << (d % 8)[None, :]
        packed = tl.sum(tl.reshape(bit, (PP, DP // 8, 8)), 2)
        tl.store(row + j * (D // 8), packed.to(tl.uint8),
                 mask=rok[:, None] & (nb < D // 8)[None, :])


def store_rows(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor,
               v_pool: torch.Tensor, codes: tuple | None = None,
               resident: tuple | None = None) -> None:
    """K/V rows [T, Hkv, D] at flat slots [T] into one layer's pools (GPU memory or UVA views of
    pinned host memory; or common.Fp8Rows) and into the GPU copies of their pages (resident:
    ResidentPages.layer);
    then, given codes (base.KeyCodes), the codes of every page whose last row this step wrote
    (reference.store_rows). Two launches: the second reads rows the first wrote, from any of its
    programs."""
    T, Hkv, D = k.shape
    (k_pool, k_scale, fp8), (v_pool, v_scale, _) = _unpack(k_pool), _unpack(v_pool)
    P = k_pool.shape[2]
    assert k.stride(-1) == v.stride(-1) == 1 and k_pool.stride(-1) == v_pool.stride(-1) == 1
    slots = slots.contiguous()
    slot_of, k_hot, v_hot = _resident(resident, k_pool, v_pool)
    BLOCK = 16
    _store_kernel[(triton.cdiv(T, BLOCK), Hkv)](
        k, v, slots, k_pool, v_pool, slot_of, k_hot, v_hot, k_scale, v_scale, T, *k.stride()[:2],
        *v.stride()[:2], *k_pool.stride()[:3], *v_pool.stride()[:3], Hkv, P, D, _p2(D), BLOCK,
        resident is not None, fp8)
    if codes is None:
        return
    packed, scales = codes
    assert packed.dtype == torch.uint8 and packed.stride(-1) == 1 and D % 8 == 0
    assert scales.dtype == torch.float16 and scales.stride(-1) == 1
    bits = packed.shape[-1] * 8 // D
    _encode_kernel[(T, Hkv)](
        k, slots, k_pool, k_scale, packed, scales, *k.stride()[:2], *k_pool.stride()[:3],
        *packed.stride()[:3], *scales.stride()[:3], Hkv, P, D, _p2(P, 1), _p2(D, 8), bits,
        2**bits - 1, fp8)
