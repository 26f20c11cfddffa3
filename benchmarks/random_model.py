"""Write a Llama-3.1-8B-shaped HF model directory with random bf16 weights, for measuring speed
and memory along the user's own path (`vengine generate --model DIR`): config.json, sharded
safetensors, and a byte-level BPE tokenizer.json trained on vengine's built-in corpus.

The weights are N(0, 0.02) (norms 1), so outputs are noise; only speed and memory mean anything.
The tensors are generated on the GPU when there is one (seconds) and written shard by shard.

    python benchmarks/random_model.py /tmp/llama8b            # 16 GB
    python benchmarks/random_model.py /tmp/tiny --layers 2 --hidden 256 --heads 4 --kv-heads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import LLAMA_8B  # benchmarks/common.py: the shapes the GPU benchmarks share
from safetensors.torch import save_file

SHARD_BYTES = 4 << 30


def hf_config(args) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": args.vocab, "hidden_size": args.hidden,
            "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
            "head_dim": args.hidden // args.heads, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 131072, "tie_word_embeddings": False,
            "attention_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def shapes(args) -> list[tuple[str, tuple[int, ...]]]:
    D = args.hidden // args.heads
    out = [("model.embed_tokens.weight", (args.vocab, args.hidden))]
    for i in range(args.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (args.heads * D, args.hidden)),
                (p + "self_attn.k_proj.weight", (args.kv_heads * D, args.hidden)),
                (p + "self_attn.v_proj.weight", (args.kv_heads * D, args.hidden)),
                (p + "self_attn.o_proj.weight", (args.hidden, args.heads * D)),
                (p + "mlp.gate_proj.weight", (args.intermediate, args.hidden)),
                (p + "mlp.up_proj.weight", (args.intermediate, args.hidden)),
                (p + "mlp.down_proj.weight", (args.hidden, args.intermediate)),
                (p + "input_layernorm.weight", (args.hidden,)),
                (p + "post_attention_layernorm.weight", (args.hidden,))]
    return out + [("model.norm.weight", (args.hidden,)), ("lm_head.weight", (args.vocab, args.hidden))]


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """Byte-level BPE trained on the built-in corpus (no download): real merges, real lengths."""
    from tokenizers import ByteLevelBPETokenizer

    from vengine.eval.activations import corpus_text

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([corpus_text()], vocab_size=vocab_size,
                            special_tokens=["<unk>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=LLAMA_8B.num_layers)
    p.add_argument("--hidden", type=int, default=LLAMA_8B.hidden_size)
    p.add_argument("--intermediate", type=int, default=LLAMA_8B.intermediate_size)
    p.add_argument("--heads", type=int, default=LLAMA_8B.num_heads)
    p.add_argument("--kv-heads", type=int, default=LLAMA_8B.num_kv_heads)
    p.add_argument("--vocab", type=int, default=LLAMA_8B.vocab_size)
    p.add_argument("--tokenizer-vocab", type=int, default=8000)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(hf_config(args), indent=1))
    write_tokenizer(args.out, args.tokenizer_vocab)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(dev).manual_seed(0)
    t0, shard, size, index, n = time.perf_counter(), {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(args.out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, shape in shapes(args):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02).cpu()
        shard[name], size = t, size + t.nbytes
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    (args.out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}))
    print(f"wrote {args.out}: {total / 1e9:.2f} GB of weights in {n} shards, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
