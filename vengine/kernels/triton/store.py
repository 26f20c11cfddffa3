"""store_rows: a step's K/V rows and their signatures written by one kernel, straight into the
pools (GPU memory or UVA views of pinned host memory) and into their pages' GPU copies. Prefill and
decode write through it; exact attention, which keeps no signatures, too (sig None)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vengine.kernels.triton.common import _INTERPRET, _mma, _p2, _resident


@triton.jit
def _store_kernel(k, v, slots, planes, k_pool, v_pool, sig, slot_of, k_hot, v_hot, T, sk0, sk1,
                  sv0, sv1, pk0, pk1, pk2, pv0, pv1, pv2, sg0, sg1, sg2, P: tl.constexpr,
                  D: tl.constexpr, DP: tl.constexpr, NBITS: tl.constexpr, NBP: tl.constexpr,
                  BLOCK: tl.constexpr, HOT: tl.constexpr, SIG: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """BLOCK tokens of one KV head: K/V rows to the pools (and to their pages' GPU copies, if
    any: HOT, the pools' strides), sign bits of k . planes packed to sig (if SIG)."""
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
    if SIG:
        pl = tl.load(planes + (h * D + d[:, None]) * NBITS + j[None, :],
                     mask=(d < D)[:, None] & (j < NBITS)[None, :], other=0.0)
        bits = (_mma(kx, pl, INTERPRET) > 0).to(tl.int32) << (j % 8)[None, :]  # [BLOCK, NBP]
        packed = tl.sum(tl.reshape(bits, (BLOCK, NBP // 8, 8)), 2)
        nb = tl.arange(0, NBP // 8)
        tl.store(sig + (page * sg0 + h * sg1 + off * sg2)[:, None] + nb[None, :],
                 packed.to(tl.uint8), mask=ok[:, None] & (nb < NBITS // 8)[None, :])


def store_rows(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, planes: torch.Tensor | None,
               k_pool: torch.Tensor, v_pool: torch.Tensor, sig: torch.Tensor | None,
               resident: tuple | None = None) -> None:
    """One kernel for a step's writes: K/V rows [T, Hkv, D] at flat slots [T] into one layer's
    pools (GPU memory or UVA views of pinned host memory), into the GPU copies of their pages
    (resident: ResidentPages.layer), and their signatures into sig (none where sig is None)."""
    T, Hkv, D = k.shape
    has_sig = sig is not None
    if not has_sig:  # never read (SIG False): placeholders of the shapes the launch reads
        planes, sig = torch.empty(1, 1, 8, device=k.device), k_pool
    nbits = planes.shape[-1]
    assert k.stride(-1) == v.stride(-1) == 1 and planes.is_contiguous() and sig.stride(-1) == 1
    assert k_pool.stride(-1) == v_pool.stride(-1) == 1 and planes.dtype == torch.float32
    slot_of, k_hot, v_hot = _resident(resident, k_pool, v_pool)
    BLOCK = 16
    _store_kernel[(triton.cdiv(T, BLOCK), Hkv)](
        k, v, slots.contiguous(), planes, k_pool, v_pool, sig, slot_of, k_hot, v_hot, T,
        *k.stride()[:2], *v.stride()[:2], *k_pool.stride()[:3], *v_pool.stride()[:3],
        *sig.stride()[:3], k_pool.shape[2], D, _p2(D), nbits, _p2(nbits, 8), BLOCK,
        resident is not None, has_sig, _INTERPRET)
