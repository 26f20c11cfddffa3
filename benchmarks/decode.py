"""Decode speed, full attention vs vAttention, side by side in one run.

Two parts:
1. end to end: the default model, a prompt of --context tokens, median seconds per decode step;
2. one attention layer alone at growing contexts (random K/V in the model's shapes): the part of
   a step that grows with the context, where vAttention reads key codes and a subset of rows.
Prints a table, writes JSON (--out), last line is the JSON. Device: wherever torch runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

import vengine
from vengine.attention.full import decode_attention
from vengine.attention.vattention import vattention_decode
from vengine.eval.activations import corpus_text
from vengine.kernels import get_kernels
from vengine.kernels.common import encode_pages

from common import git_commit, save  # benchmarks/common.py (this script's folder)


def settings(args) -> vengine.VAttention:
    return vengine.VAttention(epsilon=args.epsilon, delta=args.delta, sink=64, window=64,
                              top_k=0.02, pilot=256, seed=0)


def end_to_end(args) -> list[dict]:
    from vengine.engine.sampling import SamplingParams

    rows = []
    for name, attention in (("full", "full"), ("vattention", settings(args))):
        llm = vengine.LLM(max_context=args.context + args.steps + 8, attention=attention)
        ids = llm.tokenizer.encode(corpus_text())[: args.context]
        seq = llm.new_request(ids, SamplingParams())
        t = time.perf_counter()
        llm.runner.prefill(seq)
        prefill_s = time.perf_counter() - t
        times = []
        for _ in range(args.steps + 1):  # the first step warms the kernels up
            seq.output_ids.append(int(ids[len(seq.output_ids) % len(ids)]))
            t = time.perf_counter()
            llm.runner.decode([seq])
            times.append(time.perf_counter() - t)
        step = statistics.median(times[1:])
        stats = llm.backends.seq_stats(seq.seq_id)
        rows.append({"part": "end to end", "attention": name, "context": args.context,
                     "prefill_tokens_per_s": len(ids) / prefill_s, "ms_per_step": 1e3 * step,
                     "tokens_per_s": 1 / step, "density": stats.get("density", 1.0)})
        llm.release(seq)
        del llm
    return rows


def one_layer(args, context: int, cfg) -> list[dict]:
    """Median ms of one layer's decode attention over a paged pool of `context` random rows."""
    Hq, Hkv, D, P = args.heads, args.kv_heads, args.head_dim, 64
    g = torch.Generator().manual_seed(0)
    pages = -(-context // P)
    k = torch.randn(pages, Hkv, P, D, generator=g)
    v = torch.randn(pages, Hkv, P, D, generator=g)
    q = torch.randn(1, Hq, D, generator=g)
    tables = torch.arange(pages)[None]
    lens = torch.tensor([context])
    codes = encode_pages(k, cfg.key_bits)
    kernels = get_kernels(torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(1)

    def full():
        kk = k[tables].transpose(1, 2).reshape(1, Hkv, -1, D)
        vv = v[tables].transpose(1, 2).reshape(1, Hkv, -1, D)
        return decode_attention(q, kk, vv, lens)

    def sparse():
        return vattention_decode(q, k, v, tables, lens, codes, cfg, gen, kernels)

    rows = []
    for name, fn in (("full", full), ("vattention", sparse)):
        fn()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = fn()
            times.append(time.perf_counter() - t)
        density = r.density.mean().item() if name == "vattention" else 1.0
        rows.append({"part": "one layer", "attention": name, "context": context,
                     "ms_per_step": 1e3 * statistics.median(times), "density": density})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--layer-contexts", default="8192,32768,131072")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--heads", type=int, default=9, help="one-layer shapes (default: SmolLM2-135M)")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--skip-end-to-end", action="store_true")
    p.add_argument("--out", default="docs/decode_cpu.json")
    args = p.parse_args()

    rows = [] if args.skip_end_to_end else end_to_end(args)
    for c in (int(x) for x in args.layer_contexts.split(",")):
        rows += one_layer(args, c, settings(args))
    print(f"{'part':<11} {'attention':<11} {'context':>8} {'ms/step':>9} {'tokens/s':>9} "
          f"{'density':>8} {'x full':>7}")
    for r in rows:
        base = next(b for b in rows if b["part"] == r["part"] and b["context"] == r["context"]
                    and b["attention"] == "full")
        r["speedup_vs_full"] = base["ms_per_step"] / r["ms_per_step"]
        tps = f"{r['tokens_per_s']:9.2f}" if "tokens_per_s" in r else f"{'':>9}"
        print(f"{r['part']:<11} {r['attention']:<11} {r['context']:>8} {r['ms_per_step']:9.2f} "
              f"{tps} {r['density']:8.3f} {r['speedup_vs_full']:7.2f}")
    result = {"device": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
              "date": date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
              "settings": {"epsilon": args.epsilon, "delta": args.delta, "sink": 64, "window": 64,
                           "top_k": 0.02, "pilot": 256}, "rows": rows}
    save(result, args.out)


if __name__ == "__main__":
    main()
