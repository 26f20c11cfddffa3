"""Zero-copy access to pinned host memory from CUDA kernels (unified virtual addressing)."""

from __future__ import annotations

import torch


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
