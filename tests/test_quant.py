"""Compact CPU weights (models/quant.py) against plain PyTorch: the dequantised weight against
the float one it came from, torch's low-bit kernels against a dense matmul over that weight."""

from __future__ import annotations

import pytest
import torch

from vengine.models.quant import (DENSE_FROM, GROUP, Int4Linear, Int8Linear, QuantEmbedding,
                                  int4_fits, quantise, unpack_int4)


def _q4_1_weight(N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """A weight on GGUF Q4_1's grid: w = d * q + m per block of 32, each block spanning 0..15."""
    q = torch.randint(0, 16, (N, K // GROUP, GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(N, K // GROUP, 1, generator=gen) * 0.01 + 1e-3
    m = torch.randn(N, K // GROUP, 1, generator=gen) * 0.05
    return (d.half().float() * q + m.half().float()).view(N, K)


def test_unpack_int4_inverts_torchs_packing():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (192, 96), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(unpack_int4(packed).int(), q)
    rows = torch.tensor([0, 31, 32, 63, 64, 150, 191])
    assert torch.equal(unpack_int4(packed, rows).int(), q[rows])


def test_int4_repacks_a_q4_1_weight_up_to_its_bfloat16_scales():
    w = _q4_1_weight(128, 64, torch.Generator().manual_seed(1))
    err = (Int4Linear(w).dense(torch.float32) - w).abs()
    # scale and zero are bfloat16 (8 bits of mantissa): each weight is off by < 2^-8 of
    # 15 * scale + |zero|; a requantisation off the grid would be off by up to scale / 2
    assert err.max().item() < 2e-3, err.max().item()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("tokens", [1, 3, DENSE_FROM + 5])
def test_compact_linear_matches_a_dense_matmul_over_its_weight(cls, tokens):
    gen = torch.Generator().manual_seed(tokens)
    w, bias = torch.randn(128, 96, generator=gen), torch.randn(128, generator=gen)
    layer = cls(w, bias)
    dense = layer.dense(torch.float32)
    bound = {Int8Linear: w.abs().amax(1, keepdim=True) / 127 / 2,
             Int4Linear: 0.55 * (w.view(128, -1, GROUP).amax(-1) - w.view(128, -1, GROUP).amin(-1))
             .repeat_interleave(GROUP, 1) / 15}[cls]
    assert ((dense - w).abs() <= bound + 1e-2).all()  # rounding, plus bfloat16 scales
    x = torch.randn(2, tokens, 96, generator=gen)
    y = layer(x)
    assert y.shape == (2, tokens, 128) and y.dtype == torch.float32
    # bfloat16 inputs (activations, and the weight's values on the dense path), float32 output
    ref = x.bfloat16().float() @ layer.dense(torch.bfloat16).float().T + bias
    err = (y - ref).abs().max().item()
    assert err <= 2 ** -7 * ref.abs().max().item(), err


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_embedding_reads_rows_of_the_compact_head(cls):
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    head = cls(w)
    ids = torch.tensor([3, 0, 255, 64, 3, 97])
    out = QuantEmbedding(head, torch.bfloat16)(ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, head.dense(torch.bfloat16)[ids])


def test_int4_only_where_torchs_layout_takes_the_shape():
    assert int4_fits((128, 64)) and not int4_fits((96, 64)) and not int4_fits((128, 48))
    w = torch.randn(96, 64)
    assert isinstance(quantise(w, None, int4=True), Int8Linear)
    assert isinstance(quantise(torch.randn(128, 64), None, int4=True), Int4Linear)
    assert isinstance(quantise(torch.randn(128, 64), None, int4=False), Int8Linear)
