"""Attention quality of vAttention on real activations: guarantee, baselines, hash recall.

Captures Q/K/V of the default model over --context tokens of corpus_text() once (exact prefill),
then treats the last --queries positions of every layer as decode queries (each attends to the
keys up to its own position) and measures, over all layers, KV heads and queries:
1. vAttention at several (epsilon, delta): mean density, the observed fraction of
   (layer, query head, query) whose relative denominator error exceeds epsilon (to compare with
   delta), mean / p95 relative output error, and the certificate (mean of over_eps);
2. at the density each configuration reached (per layer, rows per KV head, i.e. equal bytes):
   oracle top-k, hash top-k and uniform sampling with the same sink and window;
3. Pearson correlation between the specified epsilon and the observed denominator error
   (mean and 95th percentile);
4. recall@k of hash top-k against the exact top-k for several signature scorings;
5. variants of vAttention: the top-k predictor (shipped 64-bit signatures; 128-bit signatures of
   centred keys; exact scores), a smaller delta (0.01) and a larger top_k (0.2), each against
   top-k alone with the same predictor at equal density.
Prints tables, writes JSON (--out) and two PNGs (--plot-dir); the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import date
from pathlib import Path

import torch

from vengine.attention.config import VAttention
from vengine.attention.vattention import vattention_decode
from vengine.eval.activations import capture, corpus_text, decode_problem, to_pages
from vengine.eval.baselines import (fixed_mask, group_scores, oracle_group_scores,
                                    oracle_kernels, relative_errors, topk_attention,
                                    uniform_attention)
from vengine.kernels import get_kernels

from common import git_commit, save  # benchmarks/common.py (this script's folder)
from vengine.kernels.common import paged_signatures
from vengine.kernels.reference import hash_scores

EPSILONS = (0.02, 0.05, 0.1, 0.2, 0.3)
DELTAS = (0.05, 0.1)
SINK, WINDOW, TOP_K, BASE_RATE = 64, 64, 0.05, 0.1
RECALL_AT = (0.02, 0.05)
PLANES_SEED = 0x5EED  # as VAttentionBackend
# section 5: (predictor, epsilon, delta, top_k); hash64 is the shipped predictor
VARIANTS = tuple((pr, e, dl, tk) for e, dl, tk, prs in (
    (0.05, 0.05, TOP_K, ("hash64", "centred128", "oracle")),
    (0.1, 0.1, TOP_K, ("hash64", "centred128", "oracle")),
    (0.1, 0.01, TOP_K, ("hash64", "centred128", "oracle")),
    (0.1, 0.1, 0.2, ("hash64", "centred128")),
) for pr in prs)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pearson(x: list[float], y: list[float]) -> float:
    t = torch.tensor([x, y], dtype=torch.float64)
    return torch.corrcoef(t)[0, 1].item()


def summary(x: torch.Tensor) -> dict[str, float]:
    x = x.flatten().double()
    return {"mean": x.mean().item(), "p95": x.quantile(0.95).item()}


# ---- hash recall variants (scorings of keys against a query by random-hyperplane signatures) ----

def sign_bits(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> [T, H, nbits] of +-1: sign(x . r_j)."""
    return torch.einsum("thd,hdn->thn", x, planes).gt(0).float() * 2 - 1


def hamming_scores(q: torch.Tensor, k_signs: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Matching sign bits between the query's and each key's signature: [B, Hq, S] (integers)."""
    B, Hq, D = q.shape
    Hkv = planes.shape[0]
    w = torch.einsum("bhgd,hdn->bhgn", q.view(B, Hkv, Hq // Hkv, D), planes)
    q_signs = w.gt(0).float() * 2 - 1
    agree = torch.einsum("bhgn,shn->bhgs", q_signs, k_signs)  # matches - mismatches
    return ((agree + planes.shape[-1]) / 2).reshape(B, Hq, -1)


def weighted_scores(q: torch.Tensor, k_signs: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """vengine's score: sum_j (q . r_j) sign(k . r_j), [B, Hq, S]."""
    B, Hq, D = q.shape
    Hkv = planes.shape[0]
    w = torch.einsum("bhgd,hdn->bhgn", q.view(B, Hkv, Hq // Hkv, D), planes)
    return torch.einsum("bhgn,shn->bhgs", w, k_signs).reshape(B, Hq, -1)


def recall_at(pred: torch.Tensor, exact: torch.Tensor, candidates: torch.Tensor,
              k: int) -> torch.Tensor:
    """|top-k(pred) & top-k(exact)| / k per (query, head), both over the candidate rows."""
    mask = ~candidates[:, None]
    top_p = pred.masked_fill(mask, -math.inf).topk(k, dim=-1).indices
    top_e = exact.masked_fill(mask, -math.inf).topk(k, dim=-1).indices
    hit = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, top_e, True)
    return hit.gather(-1, top_p).float().sum(-1) / k


# ---- baselines at equal density: vengine.eval.baselines with the per-layer work done once ----

class Baselines:
    """topk_attention and uniform_attention of vengine.eval.baselines for one DecodeProblem at
    many densities: the group rankings and the gathered V rows do not depend on the density, so
    they are computed once per layer instead of once per call;
    so are exp(s - log_scale) and the exact outputs and denominators (attend and errors)."""

    def __init__(self, p, s: torch.Tensor, log_scale: torch.Tensor, exact_out: torch.Tensor,
                 extra_rankings: dict[str, torch.Tensor] | None = None) -> None:
        B, Hq, S = s.shape
        self.p, self.s, self.ls, self.exact_out = p, s, log_scale, exact_out
        self.Hkv = p.k_pool.shape[1]
        self.G = Hq // self.Hkv
        self.v = p.rows(p.v_pool)
        self.w = torch.exp(s - log_scale[..., None]).view(B, self.Hkv, self.G, S)  # 0 past context
        self.d = self.w.sum(-1).view(B, Hq)
        self.exact_norm = exact_out.norm(dim=-1).clamp(min=1e-30)
        self.live = ~torch.isinf(s[:, 0])  # [B, S]
        self.fixed = fixed_mask(S, p.context_lens, SINK, WINDOW)
        self.fixed_live = self.fixed & self.live
        rankings = {"oracle": oracle_group_scores(s, self.Hkv),
                    "hash": group_scores(p.q, p.planes, p.sig, p.block_tables,
                                                 p.context_lens), **(extra_rankings or {})}
        skip = self.fixed_live[:, None] | ~self.live[:, None]
        self.rank = {k: r.masked_fill(skip, float("-inf")) for k, r in rankings.items()}

    def topk(self, density: float, which: str):
        B, _, S = self.s.shape
        k = max(int(density * int(self.p.context_lens.min())) - int(self.fixed_live[0].sum()), 0)
        chosen = self.fixed_live[:, None].expand(B, self.Hkv, S).clone()
        if k > 0:
            chosen.scatter_(-1, self.rank[which].topk(k, dim=-1).indices, True)
        chosen &= self.live[:, None]
        return self._attend(chosen.float())

    def uniform(self, density: float, generator: torch.Generator):
        B, _, S = self.s.shape
        p, fixed = self.p, self.fixed
        resid = self.live & ~fixed
        n_r = resid.sum(-1, keepdim=True).float()
        b = (density * p.context_lens[:, None].float() - fixed.sum(-1, keepdim=True)).clamp(min=1)
        keys = torch.rand(B, self.Hkv, S, generator=generator).masked_fill(~resid[:, None], 2.0)
        idx = keys.argsort(-1)
        rank = torch.empty_like(idx).scatter_(-1, idx, torch.arange(S).expand_as(idx))
        sampled = (rank < b[:, None]) & resid[:, None]
        count = sampled.sum(-1, keepdim=True).clamp(min=1).float()
        weight = torch.where(sampled, n_r[:, None] / count, fixed[:, None].float())
        return self._attend(weight)

    def _attend(self, weight: torch.Tensor):
        """_attend of vengine.eval.baselines with row weights [B, Hkv, S] (0 = row not used):
        exp(s + log(weight) - log_scale) = exp(s - log_scale) * weight."""
        B, Hkv, _ = weight.shape
        w = self.w * weight[:, :, None]
        out = torch.einsum("bhgs,bhsd->bhgd", w, self.v).reshape(B, Hkv * self.G, -1)
        d = w.sum(-1).view(B, -1)
        return out / d[..., None], d

    def errors(self, out: torch.Tensor, d_hat: torch.Tensor):
        """relative_errors of vengine.eval.baselines at this log_scale."""
        out_err = (out - self.exact_out).norm(dim=-1) / self.exact_norm
        return out_err, (d_hat - self.d).abs() / self.d


def check_baselines(p, s, ls, exact_out, density: float, base: Baselines) -> None:
    """The cached baselines give the package's outputs, denominators and errors."""
    def same(ref, got, what):
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(ref, got))
        err_ref, err_got = relative_errors(*ref, exact_out, s, ls), base.errors(*got)
        ok = ok and all(torch.allclose(a, b, rtol=1e-3, atol=1e-6)
                        for a, b in zip(err_ref, err_got))
        assert ok, f"cached {what} baseline differs from vengine.eval.baselines"

    for name in ("oracle", "hash"):
        same(topk_attention(p, s, density, SINK, WINDOW, ls, use_hash=name == "hash"),
             base.topk(density, name), name)
    same(uniform_attention(p, s, density, SINK, WINDOW, ls, torch.Generator().manual_seed(1)),
         base.uniform(density, torch.Generator().manual_seed(1)), "uniform")


# ---- the benchmark ----

def configs(hash_bits: int) -> list[VAttention]:
    return [VAttention(epsilon=e, delta=d, sink=SINK, window=WINDOW, top_k=TOP_K,
                       base_rate=BASE_RATE, hash_bits=hash_bits, seed=0)
            for d in DELTAS for e in EPSILONS]


def run(args) -> dict:
    from vengine.models.loader import load_model, resolve_model

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tok = load_model(resolve_model(None), torch.device("cpu"), torch.float32)
    ids = tok.encode(corpus_text())[: args.context]
    acts = capture(model, ids, keep_queries=args.queries)
    del model
    acts = acts[: args.layers] if args.layers > 0 else acts
    mc_layers, (T, Hkv, D) = len(acts), acts[0].k.shape
    Hq = acts[0].q.shape[1]
    capture_s = time.perf_counter() - t0
    print(f"captured {mc_layers} layers, {T} tokens, {Hq} query / {Hkv} KV heads, D={D} "
          f"in {capture_s:.1f} s", flush=True)

    kernels = get_kernels(torch.device("cpu"), torch.float32)
    pg = torch.Generator().manual_seed(PLANES_SEED)
    planes = torch.randn(mc_layers, Hkv, D, args.hash_bits, generator=pg)
    pg128 = torch.Generator().manual_seed(PLANES_SEED + 1)
    planes128 = torch.randn(mc_layers, Hkv, D, 128, generator=pg128)
    cfgs = configs(args.hash_bits)
    per = {i: {"viol": [], "den": [], "out": [], "cert": [], "dens": [], "layer_viol": [],
               **{f"{b}_{m}": [] for b in ("oracle", "hash", "uniform") for m in ("out", "den")}}
           for i in range(len(cfgs))}
    layer_density = {i: [] for i in range(len(cfgs))}
    variants = ("hamming64", "weighted64", "weighted128", "weighted64_centred", "hamming64_centred",
                "weighted128_centred")
    recalls = {v: {k: [] for k in RECALL_AT} for v in variants}
    recall_ks = {k: max(1, int(k * T)) for k in RECALL_AT}
    pred_stats: dict[tuple, dict[str, list]] = {}

    def seed_of(trial: int, layer: int, which: int) -> int:
        return ((args.seed * 64 + trial) * 4096 + layer) * 1024 + which

    for layer, act in enumerate(acts):
        p = decode_problem(act, planes[layer])
        s, exact_out = p.exact()
        ls = s.amax(-1)
        k_c = act.k - act.k.mean(0, keepdim=True)  # per-(layer, head) mean key removed
        sig128c = paged_signatures(to_pages(k_c), planes128[layer])
        base = Baselines(p, s, ls, exact_out, {"hash128c": group_scores(
            p.q, planes128[layer], sig128c, p.block_tables, p.context_lens)})
        # section 5's predictors: shipped signatures, exact scores (oracle) and 128-bit
        # signatures of centred keys; with the ranking top-k alone uses for each
        predictors = {"hash64": (kernels, p.sig, p.planes, "hash"),
                      "oracle": (oracle_kernels(kernels, s), p.sig, p.planes, "oracle"),
                      "centred128": (kernels, sig128c, planes128[layer], "hash128c")}
        for t in range(args.trials):
            for i, cfg in enumerate(cfgs):
                g = torch.Generator().manual_seed(seed_of(t, layer, i))
                r = vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens,
                                      p.sig, p.planes, cfg, g, kernels)
                oe, de = relative_errors(r.out, r.d_hat, exact_out, s, r.log_scale)
                d = per[i]
                d["viol"].append((de > cfg.epsilon).float().flatten())
                d["layer_viol"].append((de > cfg.epsilon).float().mean().item())
                d["den"].append(de.flatten())
                d["out"].append(oe.flatten())
                d["cert"].append(r.over_eps.flatten())
                d["dens"].append(r.density.flatten())
                density = r.density.mean().item()
                layer_density[i].append(density)
                for name in ("oracle", "hash", "uniform"):
                    if name == "uniform":
                        g_u = torch.Generator().manual_seed(seed_of(t, layer, 100 + i))
                        out, dh = base.uniform(density, g_u)
                    else:
                        out, dh = base.topk(density, name)
                    boe, bde = base.errors(out, dh)
                    d[f"{name}_out"].append(boe.flatten())
                    d[f"{name}_den"].append(bde.flatten())
                if layer == 0 and i == 2 and t == 0:  # the cached baselines are the package's
                    check_baselines(p, s, ls, exact_out, density, base)

            # 5. vAttention variants, each against top-k alone with the same predictor at equal
            # density
            for j, (name, eps, dl, tk) in enumerate(VARIANTS):
                kern, sig, pl, ranking = predictors[name]
                cfg = VAttention(epsilon=eps, delta=dl, sink=SINK, window=WINDOW, top_k=tk,
                                 base_rate=BASE_RATE, hash_bits=pl.shape[-1], seed=0)
                g = torch.Generator().manual_seed(seed_of(t, layer, 200 + j))
                r = vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens,
                                      sig, pl, cfg, g, kern)
                oe, de = relative_errors(r.out, r.d_hat, exact_out, s, r.log_scale)
                d = pred_stats.setdefault((name, eps, dl, tk), {k: [] for k in (
                    "viol", "den", "out", "cert", "dens", "topk_out", "topk_den")})
                d["viol"].append((de > eps).float().flatten())
                d["den"].append(de.flatten())
                d["out"].append(oe.flatten())
                d["cert"].append(r.over_eps.flatten())
                d["dens"].append(r.density.flatten())
                boe, bde = base.errors(*base.topk(r.density.mean().item(), ranking))
                d["topk_out"].append(boe.flatten())
                d["topk_den"].append(bde.flatten())

        # hash recall: candidates are the rows outside sink and window, as vengine's predictor
        pos = torch.arange(T)
        n = p.context_lens[:, None]
        cand = (pos < n) & (pos >= SINK) & (pos < n - WINDOW)  # [B, T]
        s_t = s[..., :T]
        q = act.q
        sg64, sg128 = sign_bits(act.k, planes[layer]), sign_bits(act.k, planes128[layer])
        sg64c, sg128c = sign_bits(k_c, planes[layer]), sign_bits(k_c, planes128[layer])
        preds = {
            "hamming64": hamming_scores(q, sg64, planes[layer]),
            "weighted64": weighted_scores(q, sg64, planes[layer]),
            "weighted128": weighted_scores(q, sg128, planes128[layer]),
            "weighted64_centred": weighted_scores(q, sg64c, planes[layer]),
            "hamming64_centred": hamming_scores(q, sg64c, planes[layer]),
            "weighted128_centred": weighted_scores(q, sg128c, planes128[layer]),
        }
        if layer == 0:  # the script's weighted score is vengine's hash_scores
            everything = torch.full_like(p.context_lens, T)
            ref = hash_scores(q, planes[layer], p.sig, p.block_tables, 0, everything)[..., :T]
            assert torch.allclose(ref, preds["weighted64"], rtol=1e-4, atol=1e-3)
        for v, pred in preds.items():
            for frac, k in recall_ks.items():
                recalls[v][frac].append(recall_at(pred, s_t, cand, k).flatten())
        print(f"layer {layer:2d} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def per_layer(values: list[float]) -> list[float]:  # layer-major, trials innermost
        return [round(x, 4) for x in torch.tensor(values).view(-1, args.trials).mean(1).tolist()]

    rows = []
    for i, cfg in enumerate(cfgs):
        d = {k: torch.cat(v) if k != "layer_viol" else v for k, v in per[i].items()}
        n_units = d["viol"].numel()
        row = {"epsilon": cfg.epsilon, "delta": cfg.delta, "units": n_units,
               "density": d["dens"].mean().item(),
               "violation_rate": d["viol"].mean().item(),
               "violation_slack_3sd": 3 * math.sqrt(cfg.delta * (1 - cfg.delta) / n_units),
               "certificate": d["cert"].mean().item(),
               "den_err": summary(d["den"]), "out_err": summary(d["out"]),
               "layer_violation_rate": per_layer(d["layer_viol"]),
               "layer_density": per_layer(layer_density[i])}
        for b in ("oracle", "hash", "uniform"):
            row[b] = {"out_err": summary(d[f"{b}_out"]), "den_err": summary(d[f"{b}_den"])}
        rows.append(row)

    variant_rows = []
    for (name, e, dl, tk), d in pred_stats.items():  # in VARIANTS order
        d = {k: torch.cat(v) for k, v in d.items()}
        n_units = d["viol"].numel()
        variant_rows.append({
            "predictor": name, "epsilon": e, "delta": dl, "top_k": tk,
            "density": d["dens"].mean().item(), "violation_rate": d["viol"].mean().item(),
            "violation_slack_3sd": 3 * math.sqrt(dl * (1 - dl) / n_units),
            "certificate": d["cert"].mean().item(),
            "den_err": summary(d["den"]), "out_err": summary(d["out"]),
            "topk_same_predictor": {"out_err": summary(d["topk_out"]),
                                    "den_err": summary(d["topk_den"])}})

    eps = [r["epsilon"] for r in rows]
    corr = {
        "all": {"mean": pearson(eps, [r["den_err"]["mean"] for r in rows]),
                "p95": pearson(eps, [r["den_err"]["p95"] for r in rows])},
        **{f"delta={dl}": {
            "mean": pearson([r["epsilon"] for r in rows if r["delta"] == dl],
                            [r["den_err"]["mean"] for r in rows if r["delta"] == dl]),
            "p95": pearson([r["epsilon"] for r in rows if r["delta"] == dl],
                           [r["den_err"]["p95"] for r in rows if r["delta"] == dl])}
           for dl in DELTAS},
    }
    recall = {v: {f"{int(100 * f)}%": torch.cat(recalls[v][f]).mean().item() for f in RECALL_AT}
              for v in variants}
    best = max(recall, key=lambda v: sum(recall[v].values()))

    return {
        "device": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "date": date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
        "kernels": kernels.__name__.rsplit(".", 1)[-1],
        "model": "default (SmolLM2-135M-Instruct)", "context": T, "queries": args.queries,
        "layers": mc_layers, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D,
        "hash_bits": args.hash_bits, "seed": args.seed, "trials": args.trials,
        "settings": {"sink": SINK, "window": WINDOW, "top_k": TOP_K, "base_rate": BASE_RATE,
                     "epsilons": list(EPSILONS), "deltas": list(DELTAS)},
        "rows": rows, "variants": variant_rows, "correlation": corr,
        "recall": {"k_rows": {f"{int(100 * f)}%": k for f, k in recall_ks.items()},
                   "variants": recall, "best": best},
        "seconds": time.perf_counter() - t0,
    }


def print_tables(res: dict) -> None:
    print(f"\nvAttention, {res['layers']} layers x {res['q_heads']} query heads x "
          f"{res['queries']} queries x {res['trials']} draws per config (sink {SINK}, "
          f"window {WINDOW}, top_k {TOP_K}, base_rate {BASE_RATE})")
    print(f"{'eps':>5} {'delta':>5} {'density':>7} {'viol':>6} {'cert':>6} {'den mean':>8} "
          f"{'den p95':>8} {'out mean':>8} {'out p95':>8}")
    for r in res["rows"]:
        print(f"{r['epsilon']:5.2f} {r['delta']:5.2f} {r['density']:7.3f} "
              f"{r['violation_rate']:6.3f} "
              f"{r['certificate']:6.3f} {r['den_err']['mean']:8.4f} {r['den_err']['p95']:8.4f} "
              f"{r['out_err']['mean']:8.4f} {r['out_err']['p95']:8.4f}")
    print("\nrelative output error (mean / p95) and denominator error (mean) at equal density")
    print(f"{'eps':>5} {'delta':>5} {'density':>7} | {'vAttention':>15} | {'oracle top-k':>15} | "
          f"{'hash top-k':>15} | {'uniform':>15} | {'den: vA / or / hash / unif':>28}")
    for r in res["rows"]:
        cells = [f"{x['out_err']['mean']:.4f}/{x['out_err']['p95']:.4f}"
                 for x in (r, r["oracle"], r["hash"], r["uniform"])]
        dens = " / ".join(f"{x['den_err']['mean']:.3f}"
                          for x in (r, r["oracle"], r["hash"], r["uniform"]))
        print(f"{r['epsilon']:5.2f} {r['delta']:5.2f} {r['density']:7.3f} | " +
              " | ".join(f"{c:>15}" for c in cells) + f" | {dens:>28}")
    print("\nvAttention variants vs top-k alone with the same predictor at equal density")
    print(f"{'predictor':<11} {'top_k':>5} {'eps':>5} {'delta':>5} {'density':>7} {'viol':>6} "
          f"{'cert':>6} {'den mean':>8} {'out mean/p95':>15} | {'top-k out mean/p95':>18} "
          f"{'top-k den':>9}")
    for r in res["variants"]:
        t = r["topk_same_predictor"]
        print(f"{r['predictor']:<11} {r['top_k']:5.2f} {r['epsilon']:5.2f} {r['delta']:5.2f} "
              f"{r['density']:7.3f} {r['violation_rate']:6.3f} {r['certificate']:6.3f} "
              f"{r['den_err']['mean']:8.4f} "
              f"{r['out_err']['mean']:7.4f}/{r['out_err']['p95']:.4f} | "
              f"{t['out_err']['mean']:9.4f}/{t['out_err']['p95']:.4f} {t['den_err']['mean']:9.4f}")
    print("\nPearson(epsilon, observed denominator error):")
    for k, v in res["correlation"].items():
        print(f"  {k:<11} mean {v['mean']:.4f}   p95 {v['p95']:.4f}")
    rc = res["recall"]
    print(f"\nhash top-k recall vs exact top-k (k = {rc['k_rows']}, rows outside sink/window)")
    for v, x in rc["variants"].items():
        print(f"  {v:<20} " + "  ".join(f"@{k} {val:.3f}" for k, val in x.items()))
    print(f"  best: {rc['best']}")


def plots(res: dict, plot_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dl, marker in zip(DELTAS, "os"):
        rr = sorted((r for r in rows if r["delta"] == dl), key=lambda r: r["density"])
        ax.plot([r["density"] for r in rr], [r["out_err"]["mean"] for r in rr], marker=marker,
                label=f"vAttention, delta={dl}")
        for r in rr:
            ax.annotate(f"eps={r['epsilon']}", (r["density"], r["out_err"]["mean"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
    rr = sorted(rows, key=lambda r: r["density"])
    for b, label, style in (("oracle", "oracle top-k", "--"), ("hash", "hash top-k", "-."),
                            ("uniform", "uniform sampling", ":")):
        ax.plot([r["density"] for r in rr], [r[b]["out_err"]["mean"] for r in rr], style,
                marker=".", label=label)
    for pred, marker, label in (("centred128", "^", "vAttention, centred 128-bit predictor"),
                                ("oracle", "*", "vAttention, exact-score predictor")):
        vv = [v for v in res["variants"] if v["predictor"] == pred]
        ax.scatter([v["density"] for v in vv], [v["out_err"]["mean"] for v in vv], marker=marker,
                   s=40, zorder=3, label=label)
        for v in vv:
            ax.annotate(f"{v['epsilon']}/{v['delta']}/k{v['top_k']}",
                        (v["density"], v["out_err"]["mean"]), fontsize=5,
                        textcoords="offset points", xytext=(3, -7))
    ax.set_xlabel("density (attended rows / context, per KV head)")
    ax.set_ylabel("mean relative output error")
    ax.set_yscale("log")
    ax.set_title(f"Output error vs density ({res['context']} tokens, {res['layers']} layers)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / "quality_error_vs_density.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for dl, marker, color in zip(DELTAS, "os", ("tab:blue", "tab:orange")):
        rr = [r for r in rows if r["delta"] == dl]
        e = [r["epsilon"] for r in rr]
        ax.plot(e, [r["den_err"]["mean"] for r in rr], marker=marker, color=color,
                label=f"mean, delta={dl}")
        ax.plot(e, [r["den_err"]["p95"] for r in rr], marker=marker, color=color, linestyle="--",
                label=f"p95, delta={dl}")
    lim = max(EPSILONS) * 1.05
    ax.plot([0, lim], [0, lim], color="gray", linewidth=1, label="y = x")
    c = res["correlation"]["all"]
    ax.set_title(f"Observed denominator error vs epsilon\nPearson r: mean {c['mean']:.4f}, "
                 f"p95 {c['p95']:.4f}", fontsize=10)
    ax.set_xlabel("specified epsilon")
    ax.set_ylabel("observed relative denominator error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / "quality_eps_calibration.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--queries", type=int, default=16, help="decode queries: the last positions")
    p.add_argument("--hash-bits", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=2, help="independent vAttention draws per query")
    p.add_argument("--layers", type=int, default=0, help="only the first N layers (quick checks)")
    p.add_argument("--out", default="docs/attention_error.json")
    p.add_argument("--plot-dir", default="docs")
    args = p.parse_args()

    res = run(args)
    print_tables(res)
    out, plot_dir = Path(args.out), Path(args.plot_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots(res, plot_dir)
    save(res, out)


if __name__ == "__main__":
    main()
