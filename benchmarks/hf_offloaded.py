"""transformers' own offloaded KV cache on the same HF directory vengine's user path runs: the
baseline (b) of issue 18 that keeps the KV in host memory without sparse attention.

Per prompt length: greedy generate with `cache_implementation="offloaded"` (each layer's K/V
moved to the CPU after use and prefetched back before it: the whole KV crosses PCIe every
step), once with 1 new token (time to first token) and once with --new-tokens (decode tokens/s
from the difference), and the peak GPU memory. A run that fails is kept with its error.

    python benchmarks/hf_offloaded.py --model /tmp/llama8b --prompt-tokens 32768,131072 \
        --out docs/hf_offloaded_gpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import git_commit, save  # noqa: E402


def generate_s(model, ids: torch.Tensor, new_tokens: int, cache: str) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   cache_implementation=cache)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", default="32768,131072")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--caches", default="offloaded,dynamic", help="cache_implementation values")
    p.add_argument("--out", default="docs/hf_offloaded_gpu.json")
    args = p.parse_args()
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    vocab = model.config.vocab_size
    rows = []
    with torch.inference_mode():
        generate_s(model, torch.randint(0, vocab, (1, 256), device="cuda"), 2, "offloaded")
        for tokens in (int(t) for t in args.prompt_tokens.split(",")):
            ids = torch.randint(0, vocab, (1, tokens), device="cuda")
            for cache in args.caches.split(","):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                row = {"cache": cache, "prompt_tokens": tokens, "new_tokens": args.new_tokens}
                try:
                    first = generate_s(model, ids, 1, cache)
                    total = generate_s(model, ids, 1 + args.new_tokens, cache)
                    row |= {"time_to_first_token_s": first,
                            "decode_tokens_per_s": args.new_tokens / max(total - first, 1e-9),
                            "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
                except Exception as e:  # out of memory, or an API this version lacks
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(row, flush=True)
                rows.append(row)
    save({"commit": git_commit(), "device": torch.cuda.get_device_name(),
          "transformers": transformers.__version__, "torch": torch.__version__,
          "command": " ".join(sys.argv), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
