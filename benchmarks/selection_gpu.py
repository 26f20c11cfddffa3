"""The selection's slowest kernel at 128K (docs/decode_gpu_eps0.1.profile.txt): key_scores (the
predictor over every row's key codes) by positions per program and warps, each checked equal to
the shipped setting (64, 4) before it is timed. Llama-3.1-8B shapes (8 KV heads, 4 query heads each,
head dim 128), batch 1, pages of 64.

    python benchmarks/selection_gpu.py --out docs/selection_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import DEV, git_commit, median_ms, save  # noqa: E402
from vengine.kernels.common import encode_pages  # noqa: E402
from vengine.kernels.triton import predict  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--repeats", type=int, default=50)
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
    for block, warps in [(b, w) for b in (32, 64, 128, 256) for w in (2, 4, 8)]:
        def run(block=block, warps=warps):
            return predict.key_scores(q, codes, tables, 0, hi, D ** -0.5, block=block,
                                      num_warps=warps)
        diff = (run() - ref).abs().max().item()
        rows.append({"kernel": "key_scores", "block": block, "num_warps": warps,
                     "ms": median_ms(run, args.repeats), "max_diff": diff})
        print(rows[-1], flush=True)
    save({"device": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
          "commit": git_commit(), "command": " ".join(sys.argv), "context": S, "rows": rows},
         args.out)


if __name__ == "__main__":
    main()
