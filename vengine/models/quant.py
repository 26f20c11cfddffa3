"""Compact linear weights for the CPU: int8 per output channel or int4 in groups of 32.

A decode step multiplies one token by every weight: on a few cores the bytes read set its
speed, not the flops. torch's own weight-only kernels read the compact weights directly
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, both with bfloat16 activations: with
float32 ones they were 5-10x slower here), so a step reads 1 or about 0.56 bytes per weight
instead of 4 (float32) or 2 (bfloat16). Many tokens at once (prefill) are compute-bound and
dequantise the weight to bfloat16 for one dense matmul instead (bfloat16 GEMMs ran 1.7-2.6x
float32's here). Either way the matmul's inputs are bfloat16 and its output comes back in the
caller's dtype: float32 activations (and KV, which the numba attention kernels read) keep
float32 everywhere else.

int4 stores w = (q - 8) * scale + zero per group of 32 inputs, q in 0..15: a Q4_0 or Q4_1
GGUF block (w = d * q + m) is exactly that, so min/max requantisation gives its values back.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32  # int4 group size (GGUF's blocks are 32 wide)
PACK_ROWS = 64  # torch's CPU int4 layout packs rows in blocks of 64 (AVX-512 tile)
DENSE_FROM = 8  # this many tokens or more: dequantise and run one dense matmul

# torch's op wants bfloat16 activations; its result is cast back to the caller's dtype
_ACT = torch.bfloat16


CHUNK_ROWS = 1024  # rows quantised at a time: a vocabulary's float32 copy is never whole


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 [N, K], float32 scale [N]): w ~ q * scale, symmetric per row."""
    q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
    for r in range(0, w.shape[0], CHUNK_ROWS):  # a load-time loop
        c = w[r:r + CHUNK_ROWS].to(torch.float32, copy=True)
        scale[r:r + CHUNK_ROWS] = s = c.abs().amax(1).clamp_min(1e-30) / 127
        q[r:r + CHUNK_ROWS] = c.div_(s[:, None]).round_().clamp_(-127, 127)
    return q, scale


def int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int32 [N, K] in 0..15, scales_and_zeros float32 [K/32, N, 2]) with
    w ~ (q - 8) * scale + zero, scale = (max - min) / 15 over each group of 32 inputs."""
    N, K = w.shape
    q, sz = torch.empty(N, K, dtype=torch.int32), torch.empty(K // GROUP, N, 2)
    for r in range(0, N, CHUNK_ROWS):  # a load-time loop
        g = w[r:r + CHUNK_ROWS].to(torch.float32, copy=True).view(-1, K // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-30)
        g = g.sub_(lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
        q[r:r + CHUNK_ROWS] = g.view(-1, K)
        sz[:, r:r + CHUNK_ROWS] = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1)
    return q, sz


def int4_fits(shape: tuple[int, ...]) -> bool:
    """Whether torch's int4 layout (rows in blocks of 64, groups of 32) takes a [N, K] weight."""
    return len(shape) == 2 and shape[0] % PACK_ROWS == 0 and shape[1] % GROUP == 0


def unpack_int4(packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """torch's CPU int4 layout (uint8 [N, K / 2]: per block of 64 rows and per input, row r's
    nibble is the low one of byte r for r < 32, the high one of byte r - 32 otherwise)
    -> q uint8 [N, K], or only the given rows [len(rows), K]. tests/test_quant.py checks it
    against the op."""
    N, K = packed.shape[0], packed.shape[1] * 2
    b = packed.view(N // PACK_ROWS, K, PACK_ROWS // 2)
    if rows is not None:
        lane = rows % PACK_ROWS
        r = b[rows // PACK_ROWS, :, lane % (PACK_ROWS // 2)]  # [len(rows), K]
        return torch.where((lane < PACK_ROWS // 2)[:, None], r & 15, r >> 4)
    q = torch.cat((b & 15, b >> 4), dim=-1)  # [N / 64, K, 64]
    return q.transpose(1, 2).reshape(N, K)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T: int8 [N, K] weight, a scale per output row."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scale = int8_rows(w)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(_ACT))
        self.bias = bias

    def dense(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or the given rows of it) dequantised to dtype: [N or len(rows), K]."""
        q, s = (self.q, self.scale) if rows is None else (self.q[rows], self.scale[rows])
        return q.to(dtype) * s.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] >= DENSE_FROM:
            y = torch.nn.functional.linear(x2.to(_ACT), self.dense(_ACT)).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(_ACT), self.q, self.scale).to(x.dtype)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], -1)


class Int4Linear(nn.Module):
    """y = x @ w.T with w = (q - 8) * scale + zero per group of 32 inputs, q packed in torch's
    CPU int4 layout (half a byte per weight, plus 4 bytes per group of 32)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, sz = int4_groups(w)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("sz", sz.to(_ACT))  # [K / 32, N, 2]: scale, zero
        self.bias = bias

    def dense(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or the given rows of it) dequantised to dtype: [N or len(rows), K]."""
        q = unpack_int4(self.packed, rows)
        sz = self.sz.to(dtype).transpose(0, 1)  # [N, K / 32, 2]
        if rows is not None:
            sz = sz[rows]
        g = (q.to(dtype).view(q.shape[0], -1, GROUP) - 8) * sz[..., :1] + sz[..., 1:]
        return g.view(q.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] >= DENSE_FROM:
            y = torch.nn.functional.linear(x2.to(_ACT), self.dense(_ACT)).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(_ACT), self.packed, GROUP,
                                                           self.sz).to(x.dtype)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], -1)


class QuantEmbedding(nn.Module):
    """The tied embedding read from the output head's compact weight: each token's row
    dequantised (no second copy of the vocabulary's weights)."""

    def __init__(self, head: Int8Linear | Int4Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head, self.dtype = head, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.dense(self.dtype, ids)


def quantise(w: torch.Tensor, bias: torch.Tensor | None, int4: bool) -> Int8Linear | Int4Linear:
    """An Int4Linear where asked and the shape fits torch's int4 layout, else an Int8Linear."""
    return Int4Linear(w, bias) if int4 and int4_fits(tuple(w.shape)) else Int8Linear(w, bias)
