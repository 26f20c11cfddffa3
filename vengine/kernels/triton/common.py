"""What the Triton kernels share: tensor-core dots to f32 accuracy, the loads of a group's queries
and of listed K/V rows (from a page's GPU copy where it has one), and the launchers' checks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vengine.kernels.common import FP8_MAX, Fp8Rows

_FP8_MAX = tl.constexpr(FP8_MAX)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


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
def _soft_cap(s, cap, CAP: tl.constexpr):
    """common.soft_cap: cap * tanh(s / cap) where CAP, by exp (tl has no tanh in the interpreter:
    libdevice's is CUDA's); apply before masking."""
    if CAP:
        t = tl.exp(-2.0 * tl.abs(s) / cap)
        mag = cap * (1.0 - t) / (1.0 + t)
        s = tl.where(s < 0, -mag, mag)
    return s


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
def _row_scale(scale, tables, row_ptr, live, b, h, st0, HKV: tl.constexpr, P: tl.constexpr):
    """The float32 scales [BLOCK_R] of an Fp8Rows pool's rows at token positions row_ptr (scale
    [pages, Hkv, P] contiguous; 0 where dead): the caller applies them after its dot, on the
    scores of K rows and on the weights of V rows, so the e4m3 values enter the dot exactly."""
    r = tl.load(row_ptr, mask=live, other=0)
    page = tl.load(tables + b * st0 + r // P, mask=live, other=0).to(tl.int64)
    return tl.load(scale + (page * HKV + h) * P + r % P, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _fp8_quantise(x):
    """common.fp8_quantise of rows x [BLOCK, DP] (padding 0), bit for bit: (e4m3-ready f32
    values [BLOCK, DP], scales [BLOCK] f32 rounded up to bfloat16). div_rn: IEEE division."""
    amax = tl.max(tl.abs(x.to(tl.float32)), 1)
    s = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, _FP8_MAX, tl.float32)), 1e-30)
    s = ((s.to(tl.int32, bitcast=True) + 0xFFFF) >> 16 << 16).to(tl.float32, bitcast=True)
    q = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(s[:, None], x.shape))
    return _round_e4m3(tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX)), s


@triton.jit
def _round_e4m3(q):
    """f32 q (|q| <= 448) rounded to the nearest e4m3 value (ties to even), still f32, so that
    the cast after it is exact. Why not the cast's own rounding: the interpreter's drops the
    carry into the exponent (127.8 -> 64); the GPU's agrees with this."""
    bits = q.to(tl.int32, bitcast=True)  # 3 of 23 mantissa bits kept: round at bit 20
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: x + magic - magic is x rounded to an integer, ties to even
    sub = ((q * 512.0 + magic) - magic) / 512.0  # subnormals: multiples of 2^-9
    return tl.where(tl.abs(q) < 0.015625, sub, normal)


# TRITON_INTERPRET=1 (read when the kernels were decorated) runs them in the CPU interpreter
_INTERPRET = not isinstance(_mma, triton.runtime.jit.JITFunction)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _unpack(pool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(rows, scale, FP8) of a pool tensor or common.Fp8Rows (scale a dummy where not FP8)."""
    if isinstance(pool, Fp8Rows):
        assert pool.rows.is_contiguous() and pool.scale.is_contiguous()
        assert pool.scale.dtype == torch.bfloat16 and pool.scale.shape == pool.rows.shape[:3]
        assert pool.rows.dtype == torch.float8_e4m3fn
        return pool.rows, pool.scale, True
    return pool, pool, False


def _check(q, pool, block_tables, rows, counts) -> None:
    assert q.dim() == 3 and pool.dim() == 4 and pool.stride(-1) == 1, "pool [pages, Hkv, P, D]"
    assert q.dtype in _DTYPES and not rows.is_floating_point()
    assert pool.dtype in _DTYPES or pool.dtype == torch.float8_e4m3fn
    assert block_tables.stride(1) == 1 and rows.stride(2) == 1 and counts.is_contiguous()
    assert q.device == pool.device == rows.device and pool.shape[1] == rows.shape[1]


def _resident(resident, k_pool: torch.Tensor, v_pool: torch.Tensor):
    """(slot_of, k_hot, v_hot), checked to share the pools' strides; dummies when None."""
    if resident is None:
        return k_pool, k_pool, v_pool  # never read (HOT False)
    slot_of, k_hot, v_hot = resident
    assert slot_of.dtype == torch.int32 and k_hot.stride() == k_pool.stride()
    assert v_hot.stride() == v_pool.stride() and k_hot.dtype == k_pool.dtype
    return resident
