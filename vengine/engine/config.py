"""EngineConfig: how an LLM runs (device, dtype, context, attention, memory), checked once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vengine.attention.config import VAttention
from vengine.attention.registry import spec_name
from vengine.checks import check_int
from vengine.errors import ConfigError
from vengine.offload.kv_pool import parse_bytes


def parse_context(value: int | str, flag: str = "--ctx") -> int:
    """8192, '8192', '8k', '128K' -> tokens."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", str(value))
        if not m:
            raise ConfigError(f"{flag}: cannot read '{value}' as a context length "
                              "(e.g. 8192, 8k, 128K)")
        n = int(m.group(1)) * (1024 if m.group(2) else 1)
    if n < 16:
        raise ConfigError(f"{flag}: context length must be at least 16 tokens, got {value}")
    return n


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: unknown device '{device}' (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' asked for, but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: '{device}' is not supported (cpu or cuda)")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype: {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: unknown dtype '{dtype}' (auto, float32, bfloat16, float16)")
    return _DTYPES[dtype]


WEIGHTS = ("auto", "dense", "int8", "int4")


def resolve_weights(weights: str, device: torch.device, dtype: torch.dtype) -> str:
    """How linear weights are held: dense (in dtype), int8 (per output row) or int4 (in groups of
    32 where the GGUF stores 5 bits or fewer per weight, int8 elsewhere); the compact forms run
    torch's CPU kernels. auto: int4 on a CPU in bfloat16 (decode reads a quarter of the bytes),
    else dense (float32 reproduces the reference logits)."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights: expected one of {', '.join(WEIGHTS)}, got {weights!r}",
                          field="weights")
    if weights == "auto":
        return "int4" if device.type == "cpu" and dtype == torch.bfloat16 else "dense"
    if weights != "dense" and device.type != "cpu":
        raise ConfigError(f"weights: {weights} runs on the CPU only (dense on {device.type})",
                          field="weights")
    return weights


def resolve_attention(attention: Any) -> Any:
    """A registered name, VAttention or plug-in (checked; "vattention" -> VAttention()), or a
    tuple of them, one per layer (its length is checked against the model when it loads)."""
    if isinstance(attention, (list, tuple)):
        return tuple(resolve_attention(a) for a in attention)
    spec_name(attention)  # raises a ConfigError naming the field
    return VAttention() if attention == "vattention" else attention


@dataclass(frozen=True)
class EngineConfig:
    model: str | Path | None = None
    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "auto"
    max_context: int | str = 8192
    attention: Any = "vattention"  # see resolve_attention; "full" is opt-in
    host_mem: int | str | None = None  # KV cap; None: max_batch full contexts, within 3/4 of RAM
    gpu_mem: int | str | None = None  # GPU budget the memory plan fits in; None: free at start
    kv: str = "auto"  # where the KV lives: auto (host for sparse attention), host or device
    kv_dtype: str = "auto"  # how rows are stored: auto (dtype) or fp8 (e4m3, a scale per row)
    weights: str = "auto"  # linear weights: dense (in dtype), int8 or int4 (CPU); resolve_weights
    max_batch: int = 8
    page_size: int = 64
    prefill_chunk: int | None = None  # prompt tokens per prefill forward; None: the whole
    # context (each layer attends over the prompt in one call; a later chunk re-reads the
    # cached prefix). The memory plan halves it until the prefill fits the GPU budget
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (GPU only)
    threads: int | None = None  # torch and numba CPU threads; None: the cores this process may use

    def __post_init__(self) -> None:
        device = resolve_device(self.device)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, device))
        object.__setattr__(self, "max_context", parse_context(self.max_context, "max_context"))
        object.__setattr__(self, "attention", resolve_attention(self.attention))
        if self.prefill_chunk is None:
            object.__setattr__(self, "prefill_chunk", self.max_context)
        for name in ("host_mem", "gpu_mem"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_bytes(getattr(self, name), name))
        if self.kv not in ("auto", "host", "device"):
            raise ConfigError(f"kv: expected auto, host or device, got {self.kv!r}", field="kv")
        if self.kv_dtype not in ("auto", "fp8"):
            raise ConfigError(f"kv_dtype: expected auto or fp8, got {self.kv_dtype!r}",
                              field="kv_dtype")
        object.__setattr__(self, "weights", resolve_weights(self.weights, device, self.dtype))
        for name in ("max_batch", "page_size", "prefill_chunk"):
            check_int(getattr(self, name), name, 1)
        if self.threads is not None:
            check_int(self.threads, "threads", 1)

    @property
    def offloaded(self) -> bool:
        """Whether the KV lives in host memory: kv="host", or by default with sparse attention
        (a model with any sparse layer keeps it all there); full attention keeps it on the
        device unless kv="host"."""
        if self.kv != "auto":
            return self.kv == "host"
        specs = self.attention if isinstance(self.attention, tuple) else (self.attention,)
        return any(s != "full" for s in specs)
