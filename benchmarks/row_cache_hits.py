"""The row cache on a real model: how many of a decode step's predicted top-k rows the step
before had read too (VAttention.row_cache's hit rate: the share of them that need not cross
PCIe), over long greedy generations at the model's trained context.

--cases prompts of --context tokens (windows of the eval's download-free corpus at different
offsets, then a request to explain it at length), each decoded for --steps tokens (ignore_eos) by
vAttention at epsilon = delta = --epsilon with the row cache and without it: the tokens must be the
same (the cache changes where rows are read from, not which), and each run's hit rate, density and
ms per token are reported. The cache pays on a GPU (host KV read over PCIe); on the CPU
(--device cpu --no-plain) it only counts its hit rate. JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vengine  # noqa: E402
from benchmarks.common import git_commit, save  # noqa: E402
from vengine.eval.activations import corpus_text  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="a path or catalog name; "
                   "\"default\": the default model")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-plain", action="store_true", help="the cached run only (its hit rate)")
    p.add_argument("--out", default="docs/row_cache_hits.json")
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    # every decode step sparse (on the CPU exact attention would serve up to 8K rows)
    spec = vengine.VAttention(epsilon=args.epsilon, delta=args.epsilon, seed=0, exact_below=0)
    model = None if args.model == "default" else args.model
    llms = {n: vengine.LLM(model=model, device=args.device, attention=dataclasses.replace(
        spec, row_cache=n), max_context=args.context + args.steps + 256,
        kv_dtype=args.kv_dtype) for n in ((1,) if args.no_plain else (0, 1))}
    tok = llms[1].tokenizer
    corpus = tok.encode(corpus_text())
    stride = max(1, (len(corpus) - args.context) // max(args.cases, 1))
    cases = []
    for i in range(args.cases):
        text = tok.decode(corpus[i * stride: i * stride + args.context - 64])
        ids = llms[1].chat_ids([{"role": "user", "content": text + "\n\nExplain in detail, "
                                 "section by section, what the text above describes."}])
        row = {"case": i, "prompt_tokens": len(ids)}
        tokens = {}
        for n, llm in llms.items():
            llm.generate(ids[:600], max_new_tokens=4, ignore_eos=True)  # warm: graphs, kernels
            sync()
            t = time.perf_counter()
            c = llm.generate(ids, max_new_tokens=args.steps, ignore_eos=True)[0]
            sync()
            key = "cached" if n else "plain"
            tokens[key] = c.token_ids
            row[key] = {"seconds": time.perf_counter() - t, **c.stats}
        row["same_tokens"] = tokens["cached"] == tokens.get("plain", tokens["cached"])
        cases.append(row)
        print(json.dumps(row), flush=True)
    hits = [c["cached"]["row_cache_hit_rate"] for c in cases]
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU, {torch.get_num_threads()} threads")
    result = {"device": device, "date": date.today().isoformat(),
              "commit": git_commit(), "command": "python " + " ".join(sys.argv),
              "model": args.model, "settings": dataclasses.asdict(spec),
              "cached_row_cache": 1, "cases": cases,
              "hit_rate_median": statistics.median(hits), "hit_rate_min": min(hits),
              "all_same_tokens": None if args.no_plain else all(c["same_tokens"] for c in cases)}
    save(result, args.out)


if __name__ == "__main__":
    main()
