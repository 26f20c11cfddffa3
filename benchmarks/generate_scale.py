"""Data-parallel batch generation: the same prompts through pools of 1, 2, 4 ... engine workers on
Ray (`vengine.distributed`, one GPU each, or a share of the CPU cores), with each pool's
throughput, its scaling efficiency against one worker, and each worker's peak memory.

Every request runs its whole length (ignore_eos) and the lengths spread over [max/2, max], so
long and short requests meet as in a real reasoning batch. Prints a table; writes JSON (--out),
the last line printed.

    python benchmarks/random_model.py /tmp/llama8b     # Llama-3.1-8B shapes, random weights
    python benchmarks/generate_scale.py --model /tmp/llama8b --prompts 256 \\
        --max-new-tokens 8192 --ctx 16k --batch-size 16 --workers 1,2,4
    python benchmarks/generate_scale.py --prompts 8 --max-new-tokens 16 --ctx 1024 \\
        --batch-size 2 --workers 1,2 --out /tmp/scale.json    # a CPU check of the script
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import date

from vengine.distributed import EnginePool, PoolConfig
from vengine.engine.sampling import SamplingParams
from vengine.errors import VengineError
from vengine.eval.activations import corpus_text

from common import git_commit, save  # benchmarks/common.py (this script's folder)


def make_requests(n: int, max_new_tokens: int, prompt_words: int, seed: int) -> list[tuple]:
    """n prompts cut from the built-in corpus (up to prompt_words words), each with its own
    length in [max_new_tokens / 2, max_new_tokens]."""
    words, rng = corpus_text().split(), random.Random(seed)
    requests = []
    for i in range(n):
        start = rng.randrange(max(1, len(words) - prompt_words))
        text = " ".join(words[start:start + rng.randint(prompt_words // 4, prompt_words)])
        length = rng.randint(max(1, max_new_tokens // 2), max_new_tokens)
        requests.append((i, f"Continue this text at length:\n\n{text}",
                         SamplingParams(max_new_tokens=length, ignore_eos=True)))
    return requests


def run_pool(workers: int, requests: list[tuple], engine: dict) -> dict:
    start = time.perf_counter()
    with EnginePool(PoolConfig(workers=workers), **engine) as pool:
        started = time.perf_counter() - start
        t0 = time.perf_counter()
        results = list(pool.completions(requests))
        seconds = time.perf_counter() - t0
        memory = pool.peak_memory()
        device = pool.workers[0].info.device
        threads = pool.workers[0].info.threads
    tokens = sum(c.stats["completion_tokens"] for _, c in results)
    assert sorted(k for k, _ in results) == sorted(r[0] for r in requests), "a request was lost"
    return {"workers": workers, "device": device, "threads_per_worker": threads,
            "start_s": round(started, 1), "seconds": round(seconds, 2),
            "requests": len(results), "generated_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "request_seconds_median": round(statistics.median(
                c.stats["seconds"] for _, c in results), 2),
            "gpu_peak_gib_per_worker": [round(m["gpu_bytes"] / 2**30, 2) for m in memory],
            "host_rss_gib_per_worker": [round(m["host_rss_bytes"] / 2**30, 2) for m in memory]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an HF directory or GGUF (default: the default model)")
    p.add_argument("--workers", default="1,2,4", help="pool sizes, comma-separated")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-words", type=int, default=400, help="longest prompt, in words")
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--ctx", default="16k", help="each engine's max_context")
    p.add_argument("--batch-size", type=int, default=16, help="requests each worker decodes")
    p.add_argument("--attention", default="vattention", choices=("vattention", "full"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/generate_scale.json")
    args = p.parse_args()
    sizes = [int(w) for w in args.workers.split(",")]
    requests = make_requests(args.prompts, args.max_new_tokens, args.prompt_words, args.seed)
    engine = {"model": args.model, "max_context": args.ctx, "max_batch": args.batch_size,
              "attention": args.attention}
    runs = []
    print(f"{'workers':>7} {'device':>7} {'seconds':>8} {'tokens/s':>9} {'efficiency':>10} "
          f"{'GPU GiB/worker':>14} {'RSS GiB/worker':>14}", flush=True)
    for workers in sizes:
        try:
            run = run_pool(workers, requests, engine)
        except VengineError as e:  # more workers than GPUs: the sizes that fit still count
            print(f"{workers:>7} skipped: {e}", flush=True)
            runs.append({"workers": workers, "skipped": str(e)})
            continue
        one = next((r for r in runs if r["workers"] == 1 and "skipped" not in r),
                   run if workers == 1 else None)
        if one is not None:  # throughput against `workers` times one worker's
            ideal = workers * one["tokens_per_s"]
            run["scaling_efficiency"] = round(run["tokens_per_s"] / ideal, 3)
        runs.append(run)
        print(f"{workers:>7} {run['device']:>7} {run['seconds']:>8.1f} {run['tokens_per_s']:>9.1f} "
              f"{run.get('scaling_efficiency', float('nan')):>10.2f} "
              f"{max(run['gpu_peak_gib_per_worker']):>14.2f} "
              f"{max(run['host_rss_gib_per_worker']):>14.2f}", flush=True)
    save({"date": date.today().isoformat(), "commit": git_commit(),
          "model": args.model or "SmolLM2-135M-Instruct (default)",
          "command": "python benchmarks/generate_scale.py " + " ".join(
              f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
          "runs": runs}, args.out)


if __name__ == "__main__":
    main()
