"""A reasoning-length generation (32K new tokens) with GPU and host memory sampled along the way.

The claim under test: with vAttention the KV cache grows in pinned host memory only, so GPU memory
stays flat however long the generation runs (the key codes live in a pool sized at start). Full
attention with the KV on the GPU is run beside it for contrast, over fewer tokens.
Writes JSON (--out); the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date

import torch

import vengine
from vengine.engine.sampling import SamplingParams

from common import git_commit, save  # benchmarks/common.py (this script's folder)


def generate_sampled(llm: vengine.LLM, tokens: int, every: int) -> dict:
    ids = llm.chat_ids([{"role": "user", "content": "Think step by step, at length: how would "
                         "you build a city on Mars? Consider every subsystem."}])
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=0.7, top_p=0.95,
                            seed=0)
    seq = llm.new_request(ids, params)
    seq.keep_cache = True  # the last sample sees the whole KV; released below
    page_bytes = llm.pool.k[0, 0].numel() * llm.pool.k.element_size() * 2 * llm.pool.k.shape[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    samples, t0 = [], time.perf_counter()
    for _ in llm.run([seq]):
        n = len(seq.output_ids)
        if n % every == 0 or seq.finish_reason is not None:
            if samples:
                print(json.dumps(samples[-1]), flush=True)
            samples.append({
                "generated": n, "seconds": time.perf_counter() - t0,
                "gpu_allocated_mib": torch.cuda.memory_allocated() / 2**20,
                "gpu_reserved_mib": torch.cuda.memory_reserved() / 2**20,
                "host_kv_mib": (llm.pool.num_pages - llm.pool.allocator.num_free) * page_bytes
                / 2**20})
        if seq.finish_reason is not None:
            break
    llm.release(seq)
    return {"samples": samples, "density": seq.stats.get("density", 1.0),
            "tokens_per_s": len(seq.output_ids) / (time.perf_counter() - t0),
            "cuda_graphs": len(llm.runner.graphs), "graph_error": llm.runner.graph_error}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--full-tokens", type=int, default=8192, help="for the full-attention contrast")
    p.add_argument("--every", type=int, default=1024)
    p.add_argument("--out", default="docs/long_generation.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("long_generation.py: needs a CUDA GPU (its claim is about GPU memory)")
    spec = vengine.VAttention(epsilon=0.1, delta=0.1, sink=64, window=64, top_k=0.03,
                              pilot=256, seed=0)
    runs = {}
    for name, attention, tokens in (("vattention", spec, args.tokens),
                                    ("full", "full", args.full_tokens)):
        if tokens <= 0:
            continue
        llm = vengine.LLM(device="cuda", max_context=args.tokens + 256, max_batch=1,
                          attention=attention)
        runs[name] = generate_sampled(llm, tokens, args.every)
        s = runs[name]["samples"]
        print(f"{name}: {s[-1]['generated']} tokens, {runs[name]['tokens_per_s']:.0f} tok/s, GPU "
              f"allocated {s[0]['gpu_allocated_mib']:.0f} -> {s[-1]['gpu_allocated_mib']:.0f} MiB, "
              f"host KV {s[0]['host_kv_mib']:.0f} -> {s[-1]['host_kv_mib']:.0f} MiB", flush=True)
        del llm
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "date": date.today().isoformat(),
              "commit": git_commit(), "model": "SmolLM2-135M-Instruct (default), bf16",
              "command": f"python benchmarks/long_generation.py --tokens {args.tokens} "
                         f"--full-tokens {args.full_tokens} --every {args.every}",
              "runs": runs}
    save(result, args.out)


if __name__ == "__main__":
    main()
