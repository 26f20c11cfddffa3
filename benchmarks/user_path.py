"""The user's path end to end: `vengine generate --input ... --output ...` as a user runs it, per
attention mode and prompt length, in a fresh process each (what a user pays: import, weight
load, pool setup, prefill, decode), with an optional GPU memory cap (a 24 GiB card on a bigger
one: torch.cuda.set_per_process_memory_fraction).

Per run: load seconds (process start until the engine is built and ready for the request:
import, CUDA start, the input checked, weights, memory plan, pool), exit seconds (the process's
teardown after the output is written), time to first token, prefill and decode tokens/s, density and certificate (from
the output row), peak host RSS and peak GPU memory (torch's reserved bytes, which is what a
smaller card must hold). A run that fails (out of memory, a refused configuration) is kept with
its one-line error: that is a result too.

    python benchmarks/user_path.py --model DIR --prompt-tokens 32768,131072 --ctx 132k \
        --modes full,vattention --gpu-cap-gib 24 --out docs/user_path.json
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(argv: list[str], gpu_cap_gib: float | None) -> None:
    """Run `vengine` in this process, then print one JSON line: exit code and peak memory."""
    import torch

    from vengine.cli.main import main
    from vengine.engine.llm import LLM

    ready = []
    init = LLM.__init__

    def timed_init(self, *args, **kwargs):  # when the engine is ready for the first request
        init(self, *args, **kwargs)
        ready.append(time.time())

    LLM.__init__ = timed_init
    if gpu_cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_cap_gib * 2**30 / total))
    rc = main(argv)
    done = time.time()
    gpu = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0
    # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)
    status = Path("/proc/self/status")
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    rss = (int(hwm.group(1)) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    print(json.dumps({"rc": rc, "peak_rss_bytes": rss, "peak_gpu_bytes": gpu,
                      "ready_wall": ready[0] if ready else None, "done_wall": done}))


def prompt_of(model: str | None, tokens: int) -> str:
    """corpus_text() cut to about `tokens` tokens of the model's tokenizer, plus a question."""
    from vengine.eval.activations import corpus_text
    from vengine.models.loader import resolve_model
    from vengine.models.tokenizer import Tokenizer

    source = resolve_model(model)
    if source.kind == "gguf":
        from vengine.models.gguf_file import gguf_metadata, open_gguf

        tok = Tokenizer.from_gguf(gguf_metadata(open_gguf(source.path)))
    else:
        tok = Tokenizer.from_dir(source.path)
    text = corpus_text()
    while len(tok.encode(text)) < tokens:
        text += "\n" + corpus_text()
    ids = tok.encode(text)[: tokens - 32]
    return tok.decode(ids) + "\n\nSummarise the text above in one paragraph."


MODES = {  # mode -> vengine generate flags
    "full": ["--attention", "full"],  # exact, KV in GPU memory on a GPU
    "full-host": ["--attention", "full", "--kv", "host"],  # exact over the pinned host KV
    "vattention": ["--attention", "vattention"],  # the default
}


def run_one(args, mode: str, tokens: int, work: Path) -> dict:
    inp, out = work / f"in_{mode}_{tokens}.jsonl", work / f"out_{mode}_{tokens}.jsonl"
    inp.write_text(json.dumps({"id": 0, "prompt": prompt_of(args.model, tokens)}) + "\n")
    argv = ["generate", "--input", str(inp), "--output", str(out), "--no-resume",
            "--ctx", args.ctx, "--max-new-tokens", str(args.max_new_tokens),
            "--device", args.device, "--batch-size", "1", *MODES[mode]]
    if mode == "vattention" and args.epsilon:
        argv += ["--epsilon", str(args.epsilon), "--delta", str(args.epsilon)]
    if args.model:
        argv += ["--model", args.model]
    if args.gpu_cap_gib:  # the memory plan is told the budget the allocator is capped at
        argv += ["--gpu-mem", f"{args.gpu_cap_gib}GiB"]
    cmd = [sys.executable, __file__, "--child", json.dumps(argv)]
    if args.gpu_cap_gib:
        cmd += ["--gpu-cap-gib", str(args.gpu_cap_gib)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    result = {"mode": mode, "prompt_tokens_asked": tokens, "wall_s": wall}
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    try:
        result |= json.loads(last[0])
    except (IndexError, json.JSONDecodeError):
        result["rc"] = proc.returncode
    if result.get("rc") != 0 or not out.exists() or not out.read_text().strip():
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        return result | {"error": (errors or proc.stderr.splitlines()[-1:] or ["?"])[-1]}
    row = json.loads(out.read_text().splitlines()[-1])
    decode_s = row["completion_tokens"] / max(row["decode_tokens_per_s"], 1e-9)
    return result | {
        "prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
        "load_s": result["ready_wall"] - t0,  # process start to the engine ready: import,
        # CUDA start, the input checked, weights, memory plan, pool
        "exit_s": t0 + wall - result["done_wall"],  # process teardown (pinned memory released)
        "weights_gb_per_s": weight_bytes(args.model) / 1e9 / (result["ready_wall"] - t0),
        "kv_bytes": row.get("kv_bytes"),
        "time_to_first_token_s": row["time_to_first_token_s"],
        "prefill_tokens_per_s": row["prompt_tokens"] / max(row["time_to_first_token_s"], 1e-9),
        "decode_tokens_per_s": row["decode_tokens_per_s"], "decode_s": decode_s,
        "density": row["density"], "certificate_violation_rate": row["certificate_violation_rate"]}


def weight_bytes(model: str | None) -> int:
    """Bytes of the weight files the load reads (safetensors shards or the GGUF)."""
    from vengine.models.loader import resolve_model

    path = Path(resolve_model(model).path)
    files = path.glob("*.safetensors") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        cap = sys.argv[sys.argv.index("--gpu-cap-gib") + 1] if "--gpu-cap-gib" in sys.argv else None
        child(json.loads(sys.argv[2]), float(cap) if cap else None)
        return
    from common import git_commit, save

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="as vengine's --model (default: the default model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--ctx", default="8k")
    p.add_argument("--prompt-tokens", default="2048", help="comma-separated prompt lengths")
    p.add_argument("--modes", default="full,vattention", help=", ".join(MODES))
    p.add_argument("--epsilon", type=float, help="vAttention epsilon = delta (default: vengine's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gpu-cap-gib", type=float, help="cap this process's GPU memory (GiB)")
    p.add_argument("--out", default="docs/user_path.json")
    args = p.parse_args()
    import platform

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in (int(t) for t in args.prompt_tokens.split(",")):
            for mode in args.modes.split(","):
                rows.append(run_one(args, mode, tokens, Path(tmp)))
                r = rows[-1]
                print(f"{mode:>10} {tokens:>7} tokens: " + (r["error"] if "error" in r else
                      f"load {r['load_s']:.1f} s ({r['weights_gb_per_s']:.2f} GB/s), TTFT {r['time_to_first_token_s']:.1f} s, "
                      f"prefill {r['prefill_tokens_per_s']:.0f} tok/s, decode "
                      f"{r['decode_tokens_per_s']:.1f} tok/s, density {r['density']:.3f}, "
                      f"RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, GPU "
                      f"{r['peak_gpu_bytes'] / 2**30:.2f} GiB"), flush=True)
    save({"device": args.device, "host": platform.node(), "date": time.strftime("%Y-%m-%d"),
          "commit": git_commit(), "command": "python " + " ".join(sys.argv),
          "gpu_cap_gib": args.gpu_cap_gib, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
