"""GGUFs as llama.cpp's converter writes them, for the families whose GGUF layout differs from
Llama's: Qwen3 (q/k norms, head_dim apart from hidden / heads), SmolLM3 (permuted Q/K, layers
without RoPE), Gemma 2 (shifted norms, alternating windows, soft-capping) and Phi-3 (fused
qkv and gate_up tensors, partial rotary, LongRoPE factors as tensors).

tests/data/gguf/<arch>.gguf is tests/data/gguf/<arch>/ (a tiny random model saved by
transformers) converted by llama.cpp's convert_hf_to_gguf.py (make_fixtures.py says how).
vengine reads the GGUF; transformers reads the safetensors: the logits must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_models import assert_logits_close

import vengine

DATA = Path(__file__).parent / "data" / "gguf"
ARCHS = ("qwen3", "smollm3", "gemma2", "phi3")


def _ids(n: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_gguf_logits_match_transformers(arch):
    import transformers as tf

    # eager: transformers' SDPA path drops Gemma 2's soft-capping
    ref_model = tf.AutoModelForCausalLM.from_pretrained(str(DATA / arch), dtype=torch.float32,
                                                        attn_implementation="eager")
    ids = _ids(100)  # past Gemma 2's window (16) and Phi-3's original length (64)
    with torch.inference_mode():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    assert ref.std() > 0.1, "random init too small: logits nearly constant"
    llm = vengine.LLM(model=str(DATA / f"{arch}.gguf"), device="cpu", dtype="float32")
    assert_logits_close(llm.logits(ids), ref, f"{arch} GGUF")
    cfg = llm.model.config
    if arch == "phi3":  # the fused tensors, partial rotary and long factors were all read
        assert cfg.rotary_dim == 6 and cfg.rope_scaling.kind == "longrope"
    if arch == "gemma2":
        assert cfg.layer_windows == (16, 0, 16, 0) and cfg.attn_softcap == 5.0


def test_info_shows_gemma2_layer_kinds(capsys):
    from vengine.cli.main import main

    assert main(["info", "--model", str(DATA / "gemma2.gguf"), "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 global attention layers, 2 sliding-window (16 tokens" in out
    assert "scores soft-capped at 5" in out
    # 2 (K, V) x 2 global layers x 2 KV heads x head dim 16 x 4 bytes
    assert "0.5 KiB in torch.float32 in the 2 global layers" in out
