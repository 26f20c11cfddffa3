"""GGUF reading through the `gguf` package: metadata as plain Python values, tensors dequantised.

llama.cpp stores Q and K of `llama` models with rows permuted for its interleaved RoPE; we undo
that here so that every model in vengine uses the HF (rotate-half) layout.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from vengine.errors import ModelLoadError

# The formats carry no checksums: non-finite values are what a load can catch of damaged data.
NON_FINITE = "holds non-finite values (NaN or inf): the file is damaged"


@functools.cache
def supported_quants() -> tuple[str, ...]:
    """Every tensor type `gguf.quants.dequantize` reads: F32 and F16, which it views directly, and
    each type with a quant class of its own name in `gguf.quants` (Q4_K, Q5_0, IQ4_XS, ...)."""
    from gguf import GGMLQuantizationType, quants

    return tuple(
        t.name
        for t in GGMLQuantizationType
        if t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        or getattr(getattr(quants, t.name, None), "qtype", None) == t
    )


def open_gguf(path: str | Path):
    """A GGUFReader, or a one-line ModelLoadError for a missing, truncated or corrupt file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError, ...
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(reader) -> dict[str, Any]:
    """All key/value fields as str, int, float, bool or lists of those."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        meta[key] = value
    return meta


# Architectures whose Q/K rows llama.cpp's converter permutes (its LlamaModel and subclasses;
# Qwen2/Qwen3 are written as they are).
_PERMUTED = ("llama", "smollm3")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` for Q/K weights (rows = heads x dim)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, path: str | Path, n_head: int, n_kv_head: int, arch: str):
    """Yield (gguf_name, float32 numpy array in HF layout) for every tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype.name not in supported_quants():
            raise ModelLoadError(
                f"{path}: tensor {t.name} uses quantisation {qtype.name}, "
                f"supported: {', '.join(supported_quants())}"
            )
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (columns) first
        try:
            w = dequantize(t.data, qtype).reshape(shape)
            w = w.astype(np.float32) if w.dtype != np.float32 or not w.flags.writeable else w
        except (ValueError, IndexError) as e:
            raise ModelLoadError(f"{path}: tensor {t.name} is truncated or corrupt ({e})") from None
        if not np.isfinite(w).all():
            raise ModelLoadError(f"{path}: tensor {t.name} {NON_FINITE}")
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp's converter stores Gemma's (1 + w) norms as 1 + w
        if arch in _PERMUTED and t.name.endswith("attn_q.weight"):
            w = _unpermute(w, n_head)
        elif arch in _PERMUTED and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv_head)
        yield t.name, w
