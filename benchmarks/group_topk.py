"""How a GQA group should pick its top-k rows: attention mass kept at equal rows.

Captures Q/K/V of the default model over --context tokens of corpus_text() (exact prefill); the
last --queries positions of every layer are decode queries. For each KV group, with k rows of the
residual (outside sink and window) per group, it measures the mean over the group's query heads
of the exact attention mass those rows hold, for these rankings:
- union k/G: each query head's own top k/G by hash score, united (the former vAttention rule);
- sum: the group's summed query against the signatures (vAttention's rule: hash scores are linear
  in the query, so this is the sum of the heads' scores);
- max: a row's best hash score over the group's heads;
- oracle max / oracle union k/G: the same two rules with the exact scores (upper references).
Prints a table; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import date

import torch

from vengine.eval.activations import capture, corpus_text, to_pages
from vengine.kernels.common import paged_signatures
from vengine.kernels.reference import hash_scores
from vengine.models.loader import load_model, resolve_model

from common import git_commit, save  # benchmarks/common.py (this script's folder)

SINK = WINDOW = 64
PLANES_SEED = 0x5EED  # as VAttentionBackend
FRACTIONS = (0.01, 0.02, 0.05)


def group_sets(hs: torch.Tensor, exact: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """hs, exact: [Hkv, G, n] scores (-inf outside the candidates) -> rows [Hkv, <= k] per rule."""
    G = hs.shape[1]
    per_head = max(k // G, 1)
    return {
        "union k/G": hs.topk(per_head, -1).indices.flatten(1),
        "sum": hs.sum(1).topk(k, -1).indices,
        "max": hs.amax(1).topk(k, -1).indices,
        "oracle max": exact.amax(1).topk(k, -1).indices,
        "oracle union k/G": exact.topk(per_head, -1).indices.flatten(1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--out", default="docs/group_topk.json")
    args = p.parse_args()

    t0 = time.perf_counter()
    model, tok = load_model(resolve_model(None), torch.device("cpu"), torch.float32)
    acts = capture(model, tok.encode(corpus_text())[: args.context], keep_queries=args.queries)
    T, Hkv, D = acts[0].k.shape
    G = acts[0].q.shape[1] // Hkv
    gen = torch.Generator().manual_seed(PLANES_SEED)
    planes = torch.randn(len(acts), Hkv, D, 64, generator=gen)
    kept: dict[tuple[float, str], list[float]] = {}
    for layer, a in enumerate(acts):
        sig = paged_signatures(to_pages(a.k), planes[layer])  # [pages, Hkv, P, nbytes]
        tables = torch.arange(sig.shape[0])[None]
        for i in range(args.queries):
            n = T - args.queries + i + 1
            q = a.q[i].view(Hkv, G, D)
            s = torch.einsum("hgd,shd->hgs", q, a.k[:n]) / math.sqrt(D)  # [Hkv, G, n]
            weights = s.softmax(-1)
            cand = torch.zeros(n, dtype=torch.bool)
            cand[SINK : n - WINDOW] = True
            hs = hash_scores(a.q[i][None], planes[layer], sig, tables, SINK,
                             torch.tensor([n - WINDOW]))[..., :n].view(Hkv, G, n)
            exact = s.masked_fill(~cand, -math.inf)
            for frac in FRACTIONS:
                for rule, rows in group_sets(hs, exact, int(frac * n)).items():
                    chosen = torch.zeros(Hkv, n, dtype=torch.bool).scatter_(-1, rows, True) & cand
                    kept.setdefault((frac, rule), []).append(
                        (weights * chosen[:, None]).sum(-1).mean().item())
    table = {f"{frac:g}": {rule: sum(v) / len(v) for (f, rule), v in kept.items() if f == frac}
             for frac in FRACTIONS}
    rules = list(next(iter(table.values())))
    print(f"attention mass kept by k rows per KV group (mean over layers, heads, {args.queries} "
          f"queries, context {T})")
    print(f"{'k / context':>11} " + " ".join(f"{r:>17}" for r in rules))
    for frac, row in table.items():
        print(f"{frac:>11} " + " ".join(f"{row[r]:17.4f}" for r in rules))
    save({"date": date.today().isoformat(), "commit": git_commit(), "context": T,
          "queries": args.queries, "layers": len(acts), "q_heads": G * Hkv, "kv_heads": Hkv,
          "sink": SINK, "window": WINDOW, "hash_bits": 64,
          "command": f"python benchmarks/group_topk.py --context {args.context} "
                     f"--queries {args.queries} --out {args.out}",
          "mass_kept": table, "seconds": time.perf_counter() - t0}, args.out)


if __name__ == "__main__":
    main()
