"""GGUF files: metadata as plain Python values, tensors dequantised by the `gguf` package.

The header is parsed here, not by gguf.GGUFReader: the reader builds a numpy view per array
element, 10.7 s for Gemma 3's 262,144-token vocabulary and 2.3 s for SmolLM2's 49K on this
repo's 2-core machine, against 0.2 s here. This reader walks the key/value section with struct and np.frombuffer (format:
github.com/ggml-org/ggml/blob/master/docs/gguf.md) and hands gguf's `dequantize` the tensors'
bytes, memory-mapped.

llama.cpp stores Q and K of `llama` models with rows permuted for its interleaved RoPE; we undo
that here so that every model in vengine uses the HF (rotate-half) layout.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


# GGUF value types -> struct format (scalars) or numpy dtype (arrays); 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
           10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # ne0 (columns) first, as GGUF lists it
    data: np.ndarray  # uint8 [rows..., bytes per row], memory-mapped


class GGUFFile:
    """A GGUF file's metadata (`meta`: key -> str, int, float, bool or lists of those) and
    tensors, read once."""

    def __init__(self, path: Path) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.buf = np.memmap(path, mode="r", dtype=np.uint8)
        raw = memoryview(self.buf)
        self._pos = 0
        if bytes(raw[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported (2 or later)")
        self._pos = 24
        self.meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string(raw)
            (vtype,) = self._unpack(raw, "<I")
            self.meta[key] = self._value(raw, vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string(raw)
            (n_dims,) = self._unpack(raw, "<I")
            dims = self._unpack(raw, f"<{n_dims}Q")
            ttype, offset = self._unpack(raw, "<IQ")
            infos.append((name, dims, ttype, offset))
        align = int(self.meta.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = []
        for name, dims, ttype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            row_bytes = dims[0] // block * type_size
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            begin = start + offset
            if begin + rows * row_bytes > len(self.buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            data = self.buf[begin: begin + rows * row_bytes].reshape(*reversed(dims[1:]),
                                                                     row_bytes)
            self.tensors.append(GGUFTensor(name, ttype, tuple(dims), data))

    def release(self, t: GGUFTensor) -> None:
        """Drop the mapped pages of t's bytes from this process's memory (they are read again
        from the file if touched): a tensor's file pages count in RSS until then."""
        page = mmap.PAGESIZE
        begin = t.data.ctypes.data - self.buf.ctypes.data
        start, end = begin // page * page, -(-(begin + t.data.nbytes) // page) * page
        self.buf._mmap.madvise(mmap.MADV_DONTNEED, start, min(end, len(self.buf)) - start)

    def _unpack(self, raw, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, raw, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self, raw) -> str:
        (n,) = struct.unpack_from("<Q", raw, self._pos)
        text = bytes(raw[self._pos + 8: self._pos + 8 + n])
        if len(text) != n:
            raise ValueError("a string runs past the end of the file")
        self._pos += 8 + n
        return text.decode("utf-8")

    def _value(self, raw, vtype: int) -> Any:
        if vtype == 8:
            return self._string(raw)
        if vtype in _SCALARS:
            return self._unpack(raw, _SCALARS[vtype])[0]
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self._unpack(raw, "<IQ")
        if etype in _DTYPES:
            dtype = np.dtype(_DTYPES[etype])
            values = np.frombuffer(raw, dtype, count, self._pos)
            self._pos += count * dtype.itemsize
            return values.tolist()
        return [self._value(raw, etype) for _ in range(count)]


def open_gguf(path: str | Path) -> GGUFFile:
    """The file's metadata and tensors, or a one-line ModelLoadError for a missing, truncated or
    corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    try:
        return GGUFFile(path)
    except Exception as e:  # struct errors, ValueError, UnicodeDecodeError, KeyError, ...
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value fields as str, int, float, bool or lists of those."""
    return dict(reader.meta)


def gguf_rope_factors(reader: GGUFFile) -> dict[str, tuple[float, ...]] | None:
    """A Phi-3 GGUF's LongRoPE factors (tensors rope_factors_short / _long, float32), read into
    the config: {"short": ..., "long": ...}, or None where the file has none."""
    found = {t.name.split(".")[0].removeprefix("rope_factors_"): t for t in reader.tensors
             if t.name.startswith("rope_factors_")}
    if set(found) != {"short", "long"}:
        return None
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return {k: tuple(float(x) for x in dequantize(t.data, GGMLQuantizationType(t.tensor_type))
                     .ravel()) for k, t in found.items()}


# Architectures whose Q/K rows llama.cpp's converter permutes (its LlamaModel and subclasses;
# Qwen2/Qwen3 are written as they are).
_PERMUTED = ("llama", "smollm3")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` for Q/K weights (rows = heads x dim)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


CHUNK = 1 << 20  # weights dequantised at a time: float32 temporaries stay at 4 MiB


def gguf_tensors(reader: GGUFFile, path: str | Path, n_head: int, n_kv_head: int, arch: str,
                 dtype: torch.dtype = torch.float32):
    """Yield (gguf_name, torch tensor in `dtype`, HF layout) for every tensor. Each is
    dequantised CHUNK weights at a time straight into its `dtype` tensor, and the file's pages
    it was read from are dropped (MADV_DONTNEED) once it is: a load holds one tensor's worth
    of float32 at most, not the whole file's mapped bytes plus every dequantised tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name.startswith("rope_factors_"):  # config, not weights (gguf_rope_factors)
            continue
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype.name not in supported_quants():
            raise ModelLoadError(
                f"{path}: tensor {t.name} uses quantisation {qtype.name}, "
                f"supported: {', '.join(supported_quants())}"
            )
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (columns) first
        out = torch.empty(shape, dtype=dtype)
        rows, data = out.view(-1, shape[-1]), t.data.reshape(-1, t.data.shape[-1])
        step = max(1, CHUNK // shape[-1])
        for r in range(0, rows.shape[0], step):
            try:
                w = dequantize(data[r:r + step], qtype).reshape(-1, shape[-1])
            except (ValueError, IndexError) as e:
                raise ModelLoadError(f"{path}: tensor {t.name} is truncated or corrupt ({e})"
                                     ) from None
            if not np.isfinite(w).all():
                raise ModelLoadError(f"{path}: tensor {t.name} {NON_FINITE}")
            if arch in ("gemma2", "gemma3") and t.name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp's converter stores Gemma's (1 + w) norms as 1 + w
            rows[r:r + step] = torch.from_numpy(np.require(w, np.float32, "W"))
        reader.release(t)
        if arch in _PERMUTED and t.name.endswith("attn_q.weight"):
            out = _unpermute(out, n_head)
        elif arch in _PERMUTED and t.name.endswith("attn_k.weight"):
            out = _unpermute(out, n_kv_head)
        yield t.name, out
