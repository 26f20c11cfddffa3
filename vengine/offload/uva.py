"""Zero-copy access to pinned host memory from CUDA kernels (unified virtual addressing)."""

from __future__ import annotations

import torch

from vengine.errors import HostMemoryError


def uva_view(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor aliasing the pinned host tensor t: kernels that read or write it go over PCIe.

    Why not .to("cuda"): that copies everything; through the view a kernel moves only the rows it
    touches (50 GB/s for scattered 256-byte rows on the lent H100, DESIGN.md).
    """
    if not (t.is_pinned() and t.is_contiguous()):
        raise ValueError("uva_view needs a contiguous pinned tensor")

    class _Interface:  # holds t so the memory outlives the view
        base = t
        __cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": f"<i{t.element_size()}",
                                    "data": (t.data_ptr(), False), "version": 3, "strides": None}

    return torch.as_tensor(_Interface(), device="cuda").view(t.dtype)


_PORTABLE_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped


def pin_range(address: int, nbytes: int) -> tuple[int, int]:
    """Page-lock host memory [address, address + nbytes) and map it for the GPU
    (cudaHostRegister): the same address then works in kernels (UVA). Why not pin_memory():
    that copies into a new pinned buffer; the pool pins its own pages in place, slab by slab,
    as they are first used, so nothing is pinned before it is needed."""
    err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, _PORTABLE_MAPPED))
    if err != 0:
        raise HostMemoryError(f"could not pin {nbytes / 2**20:.0f} MiB of host KV memory "
                              f"(cudaHostRegister error {err}; is the locked-memory limit, "
                              "ulimit -l, too low? lower --host-mem)")
    return address, nbytes


def unpin_range(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)
