"""The selection's slowest kernels at 128K (docs/decode_gpu_eps0.1.profile.txt): key_scores (the
predictor over every row's key codes) by positions per program and warps, the group ranking
(group_scores against key_scores + torch ops), and partial_attention over a context-wide row
buffer of a few thousand rows (the second sample's shape), each checked against the shipped
setting (and key_scores against the torch reference) before it is timed; with --baseline, an
earlier commit's kernels beside them in the same run. Llama-3.1-8B shapes (8 KV heads, 4 query
heads each, head dim 128), batch 1, pages of 64.

    python benchmarks/selection_gpu.py --out docs/selection_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import DEV, git_commit, median_ms, save  # noqa: E402
from vengine.kernels import reference  # noqa: E402
from vengine.kernels.common import encode_pages, ranked  # noqa: E402
from vengine.kernels.triton import attend, predict  # noqa: E402


def load(path: Path):
    """A kernel module from a file (an earlier commit's, for the side-by-side)."""
    spec = importlib.util.spec_from_file_location(f"baseline_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--baseline", default="", help="a folder with predict.py and attend.py of an "
                   "earlier commit (git show REV:vengine/kernels/triton/NAME.py): timed beside")
    p.add_argument("--out", default="docs/selection_gpu.json")
    args = p.parse_args()
    torch.manual_seed(0)
    Hkv, G, D, P, S = 8, 4, 128, 64, args.context
    pages = S // P
    k = torch.randn(pages, Hkv, P, D, device=DEV, dtype=torch.bfloat16)
    codes = encode_pages(k, 3)
    q = torch.randn(1, Hkv * G, D, device=DEV, dtype=torch.bfloat16)
    tables = torch.arange(pages, device=DEV, dtype=torch.int32)[None]
    hi = torch.tensor([S], device=DEV)
    rows = []
    ref = predict.key_scores(q, codes, tables, 0, hi, D ** -0.5)
    oracle = reference.key_scores(q, codes, tables, 0, hi, D ** -0.5)
    rows.append({"check": "vs the torch reference", "max_diff": (ref - oracle).abs().max().item()})
    old = {name: load(Path(args.baseline) / f"{name}.py") for name in ("predict", "attend")
           } if args.baseline else {}
    if old:
        def run_old():
            return old["predict"].key_scores(q, codes, tables, 0, hi, D ** -0.5)
        rows.append({"kernel": "key_scores (baseline)", "file": args.baseline,
                     "ms": median_ms(run_old, args.repeats),
                     "max_diff": (run_old() - ref).abs().max().item()})
        print(rows[-1], flush=True)
    for block, warps in [(b, w) for b in (16, 32, 64) for w in (1, 2, 4, 8)]:
        def run(block=block, warps=warps):
            return predict.key_scores(q, codes, tables, 0, hi, D ** -0.5, block=block,
                                      num_warps=warps)
        diff = (run() - ref).abs().max().item()
        rows.append({"kernel": "key_scores", "block": block, "num_warps": warps,
                     "ms": median_ms(run, args.repeats), "max_diff": diff})
        print(rows[-1], flush=True)
    # the ranking the top-k picks from: key_scores then common.ranked's torch ops (the step
    # before group_scores), against group_scores' three kernels
    lens = hi
    window = 128

    def ranked_torch():
        s_hat = predict.key_scores(q, codes, tables, 0, lens // P * P, D ** -0.5)
        return ranked(s_hat, Hkv, 128, lens - window)

    def ranked_fused():
        return predict.group_scores(q, codes, tables, lens // P * P, 128, lens - window,
                                    D ** -0.5)

    want = ranked_torch()
    for name, fn in (("ranking: key_scores + torch ops", ranked_torch),
                     ("ranking: group_scores", ranked_fused)):
        got = fn()
        finite = want.isfinite()
        assert torch.equal(got.isfinite(), finite), name
        rows.append({"kernel": name, "ms": median_ms(fn, args.repeats),
                     "max_diff": (got - want)[finite].abs().max().item()})
        print(rows[-1], flush=True)
    # partial_attention over a row buffer as wide as the context holding a few thousand rows
    # (the second sample's shape), K/V in GPU memory: the combine reads only live splits
    v = torch.randn_like(k)
    n_rows = 4000
    listed = torch.sort(torch.randperm(S, device=DEV)[:n_rows])[0].to(torch.int32)
    buf = torch.zeros(1, Hkv, S, device=DEV, dtype=torch.int32)
    buf[..., :n_rows] = listed
    counts = torch.full((1, Hkv), n_rows, device=DEV, dtype=torch.int32)
    logw = torch.zeros(1, Hkv, S, device=DEV)
    impls = {"partial_attention": attend} | ({"partial_attention (baseline)": old["attend"]}
                                             if old else {})
    base = attend.partial_attention(q, k, v, tables, buf, counts, logw, D ** -0.5)
    for name, mod in impls.items():
        def run(mod=mod):
            return mod.partial_attention(q, k, v, tables, buf, counts, logw, D ** -0.5)
        rows.append({"kernel": name, "rows": n_rows, "width": S,
                     "ms": median_ms(run, args.repeats),
                     "max_diff": max((a - b).abs().max().item() for a, b in zip(run(), base))})
        print(rows[-1], flush=True)
    save({"device": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
          "commit": git_commit(), "command": " ".join(sys.argv), "context": S, "rows": rows},
         args.out)


if __name__ == "__main__":
    main()
