"""Kernel backends by name: 'torch' (reference), 'numba' (CPU), 'triton' (GPU); imported lazily."""

from __future__ import annotations

import importlib
import os
from typing import cast

import torch

from vengine.errors import ConfigError
from vengine.kernels.base import KernelBackend

_MODULES = {"torch": "vengine.kernels.reference", "numba": "vengine.kernels.numba_cpu",
            "triton": "vengine.kernels.triton"}


def get_kernels(device: torch.device, dtype: torch.dtype, name: str | None = None
                ) -> KernelBackend:
    """The kernel module for a device: triton on CUDA, numba for float32 on CPU, else (16-bit or
    fp8 KV on CPU) the torch reference.

    VENGINE_KERNELS=torch|numba|triton overrides the choice.
    """
    name = name or os.environ.get("VENGINE_KERNELS")
    if name is None:
        if device.type == "cuda":
            name = "triton"
        else:
            name = "numba" if device.type == "cpu" and dtype == torch.float32 else "torch"
    if name == "numba" and dtype == torch.float8_e4m3fn:
        raise ConfigError("VENGINE_KERNELS: numba does not read fp8 KV (use torch or triton)")
    if name not in _MODULES:
        raise ConfigError(f"VENGINE_KERNELS: unknown kernel backend '{name}' ({', '.join(_MODULES)})")
    try:
        return cast(KernelBackend, importlib.import_module(_MODULES[name]))
    except ImportError as e:
        if name != "triton":
            raise
        raise ConfigError(f"kernel backend 'triton' needs the triton package ({e}); install it or "
                          "set VENGINE_KERNELS=torch") from e
