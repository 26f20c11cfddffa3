"""Compact CPU weights against the float32 dense model: logits over a prose text and greedy tokens
on tests/data/golden_tokens.json's full-attention greedy prompts (recorded in float32, dense).

For each (dtype, weights): mean and max |logit difference| and top-1 agreement over `--positions`
tokens of corpus_text (full attention, one forward), and for the golden prompts the share of
greedy tokens equal to the recorded float32 ones before the first difference, and the first
difference's position.

    python benchmarks/weights_parity.py --out docs/weights_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=400)
    p.add_argument("--configs", default="bfloat16/dense,float32/int4,bfloat16/int4,"
                   "float32/int8,bfloat16/int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/weights_parity.json")
    args = p.parse_args()
    import vengine
    from benchmarks.common import git_commit, save
    from vengine.eval.activations import corpus_text

    record = json.loads((ROOT / "tests" / "data" / "golden_tokens.json").read_text())
    cases = [c for c in record["cases"] if c["attention"] == "full"
             and c["sampling"].get("temperature", 0.0) == 0.0]
    ref = vengine.LLM(device="cpu", dtype="float32", weights="dense", attention="full",
                      threads=args.threads)
    ids = ref.tokenizer.encode(corpus_text())[:args.positions]
    base = ref.logits(ids)
    rows = []
    for config in args.configs.split(","):
        dtype, weights = config.split("/")
        llm = vengine.LLM(device="cpu", dtype=dtype, weights=weights, attention="full",
                          threads=args.threads)
        logits = llm.logits(ids)
        diff = logits - base
        top1 = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
        same = total = 0
        firsts = []
        for case in cases:
            for want, got in zip(case["tokens"], llm.generate(case["prompts"], **case["sampling"])):
                n = next((j for j, (a, b) in enumerate(zip(want, got.token_ids)) if a != b),
                         min(len(want), len(got.token_ids)))
                same, total = same + n, total + len(want)
                firsts.append(n)
        rows.append({"dtype": dtype, "weights": weights, "positions": len(ids),
                     "mean_abs_logit_diff": diff.abs().mean().item(),
                     "max_abs_logit_diff": diff.abs().max().item(), "top1_agreement": top1,
                     "golden_prompts": len(firsts), "golden_tokens_before_first_difference":
                     same / total, "first_difference_at": firsts})
        print(json.dumps(rows[-1]), flush=True)
    save({"date": str(date.today()), "commit": git_commit(), "load": os.getloadavg(),
          "golden_commit": record["commit"], "command": " ".join(sys.argv), "rows": rows},
         args.out)


if __name__ == "__main__":
    main()
