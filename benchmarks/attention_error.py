"""Attention quality of vAttention on real activations: guarantee, baselines, predictor recall.

Captures Q/K/V of the default model over --context tokens of corpus_text() once (exact prefill),
then treats the last --queries positions of every layer as decode queries (each attends to the
keys up to its own position) and measures, over all layers, KV heads and queries:
1. vAttention at several (epsilon, delta): mean density, the observed fraction of
   (layer, query head, query) whose relative denominator error exceeds epsilon (to compare with
   delta), mean / p95 relative output error, and the certificate (mean of over_eps: heads the
   sample's cap kept from their budget);
2. at the density each configuration reached (per layer, rows per KV head, i.e. equal bytes):
   oracle top-k, codes top-k (the shipped predictor: the group's rows ranked from the key codes)
   and uniform sampling with the same sink and window;
3. Pearson correlation between the specified epsilon and the observed denominator error
   (mean and 95th percentile);
4. recall@k of codes top-k against the exact top-k, per KV group;
5. variants of vAttention: the top-k predictor (the shipped key codes; exact scores), a smaller
   delta (0.01) and a larger top_k (0.2), each against top-k alone with the same predictor at
   equal density.
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
from vengine.eval.activations import capture, corpus_text, decode_problem
from vengine.eval.baselines import (fixed_mask, oracle_kernels, predicted_group_scores,
                                    relative_errors, topk_attention, uniform_attention)
from vengine.kernels import get_kernels
from vengine.kernels.common import group_log_weights

from common import git_commit, save  # benchmarks/common.py (this script's folder)

EPSILONS = (0.02, 0.05, 0.1, 0.2, 0.3)
DELTAS = (0.05, 0.1)
SINK, WINDOW, TOP_K, PILOT = 64, 64, 0.05, 256
RECALL_AT = (0.02, 0.05)
# section 5: (predictor, epsilon, delta, top_k); codes is the shipped predictor
VARIANTS = tuple((pr, e, dl, tk) for e, dl, tk, prs in (
    (0.05, 0.05, TOP_K, ("codes", "oracle")),
    (0.1, 0.1, TOP_K, ("codes", "oracle")),
    (0.1, 0.01, TOP_K, ("codes", "oracle")),
    (0.1, 0.1, 0.2, ("codes",)),
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


def recall_at(pred: torch.Tensor, exact: torch.Tensor, k: int) -> torch.Tensor:
    """|top-k(pred) & top-k(exact)| / k per (query, KV group) of two rankings [B, Hkv, S]
    (-inf off the candidates in both)."""
    top_e = exact.topk(k, dim=-1).indices
    hit = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, top_e, True)
    return hit.gather(-1, pred.topk(k, dim=-1).indices).float().sum(-1) / k


# ---- baselines at equal density: vengine.eval.baselines with the per-layer work done once ----

class Baselines:
    """topk_attention and uniform_attention of vengine.eval.baselines for one DecodeProblem at
    many densities: the group rankings and the gathered V rows do not depend on the density, so
    they are computed once per layer instead of once per call;
    so are exp(s - log_scale) and the exact outputs and denominators (attend and errors)."""

    def __init__(self, p, s: torch.Tensor, log_scale: torch.Tensor,
                 exact_out: torch.Tensor) -> None:
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
        rankings = {"oracle": group_log_weights(s, self.Hkv), "codes": predicted_group_scores(p)}
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

    for name in ("oracle", "codes"):
        same(topk_attention(p, s, density, SINK, WINDOW, ls, predicted=name == "codes"),
             base.topk(density, name), name)
    same(uniform_attention(p, s, density, SINK, WINDOW, ls, torch.Generator().manual_seed(1)),
         base.uniform(density, torch.Generator().manual_seed(1)), "uniform")


# ---- the benchmark ----

def configs(key_bits: int) -> list[VAttention]:
    return [VAttention(epsilon=e, delta=d, sink=SINK, window=WINDOW, top_k=TOP_K, pilot=PILOT,
                       key_bits=key_bits, seed=0)
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
    cfgs = configs(args.key_bits)
    per = {i: {"viol": [], "den": [], "out": [], "cert": [], "dens": [], "layer_viol": [],
               **{f"{b}_{m}": [] for b in ("oracle", "codes", "uniform") for m in ("out", "den")}}
           for i in range(len(cfgs))}
    layer_density = {i: [] for i in range(len(cfgs))}
    recalls = {k: [] for k in RECALL_AT}
    recall_ks = {k: max(1, int(k * T)) for k in RECALL_AT}
    pred_stats: dict[tuple, dict[str, list]] = {}

    def seed_of(trial: int, layer: int, which: int) -> int:
        return ((args.seed * 64 + trial) * 4096 + layer) * 1024 + which

    for layer, act in enumerate(acts):
        p = decode_problem(act, args.key_bits)
        s, exact_out = p.exact()
        ls = s.amax(-1)
        base = Baselines(p, s, ls, exact_out)
        # section 5's predictors, named as the rankings top-k alone uses for each
        predictors = {"codes": kernels, "oracle": oracle_kernels(kernels, s)}
        for t in range(args.trials):
            for i, cfg in enumerate(cfgs):
                g = torch.Generator().manual_seed(seed_of(t, layer, i))
                r = vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens,
                                      p.codes, cfg, g, kernels)
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
                for name in ("oracle", "codes", "uniform"):
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
                cfg = VAttention(epsilon=eps, delta=dl, sink=SINK, window=WINDOW, top_k=tk,
                                 pilot=PILOT, key_bits=args.key_bits, seed=0)
                g = torch.Generator().manual_seed(seed_of(t, layer, 200 + j))
                r = vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens,
                                      p.codes, cfg, g, predictors[name])
                oe, de = relative_errors(r.out, r.d_hat, exact_out, s, r.log_scale)
                d = pred_stats.setdefault((name, eps, dl, tk), {k: [] for k in (
                    "viol", "den", "out", "cert", "dens", "topk_out", "topk_den")})
                d["viol"].append((de > eps).float().flatten())
                d["den"].append(de.flatten())
                d["out"].append(oe.flatten())
                d["cert"].append(r.over_eps.flatten())
                d["dens"].append(r.density.flatten())
                boe, bde = base.errors(*base.topk(r.density.mean().item(), name))
                d["topk_out"].append(boe.flatten())
                d["topk_den"].append(bde.flatten())

        # recall: the group rankings over the rows outside sink and window, as vAttention's top-k
        for frac, k in recall_ks.items():
            recalls[frac].append(recall_at(base.rank["codes"], base.rank["oracle"], k).flatten())
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
        for b in ("oracle", "codes", "uniform"):
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

    return {
        "device": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "date": date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
        "kernels": kernels.__name__.rsplit(".", 1)[-1],
        "model": "default (SmolLM2-135M-Instruct)", "context": T, "queries": args.queries,
        "layers": mc_layers, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D,
        "key_bits": args.key_bits, "seed": args.seed, "trials": args.trials,
        "settings": {"sink": SINK, "window": WINDOW, "top_k": TOP_K, "pilot": PILOT,
                     "epsilons": list(EPSILONS), "deltas": list(DELTAS)},
        "rows": rows, "variants": variant_rows, "correlation": corr,
        "recall": {"k_rows": {f"{int(100 * f)}%": k for f, k in recall_ks.items()},
                   "codes": {f"{int(100 * f)}%": torch.cat(recalls[f]).mean().item()
                             for f in RECALL_AT}},
        "seconds": time.perf_counter() - t0,
    }


def print_tables(res: dict) -> None:
    print(f"\nvAttention, {res['layers']} layers x {res['q_heads']} query heads x "
          f"{res['queries']} queries x {res['trials']} draws per config (sink {SINK}, "
          f"window {WINDOW}, top_k {TOP_K}, pilot {PILOT})")
    print(f"{'eps':>5} {'delta':>5} {'density':>7} {'viol':>6} {'cert':>6} {'den mean':>8} "
          f"{'den p95':>8} {'out mean':>8} {'out p95':>8}")
    for r in res["rows"]:
        print(f"{r['epsilon']:5.2f} {r['delta']:5.2f} {r['density']:7.3f} "
              f"{r['violation_rate']:6.3f} "
              f"{r['certificate']:6.3f} {r['den_err']['mean']:8.4f} {r['den_err']['p95']:8.4f} "
              f"{r['out_err']['mean']:8.4f} {r['out_err']['p95']:8.4f}")
    print("\nrelative output error (mean / p95) and denominator error (mean) at equal density")
    print(f"{'eps':>5} {'delta':>5} {'density':>7} | {'vAttention':>15} | {'oracle top-k':>15} | "
          f"{'codes top-k':>15} | {'uniform':>15} | {'den: vA / or / codes / unif':>28}")
    for r in res["rows"]:
        cells = [f"{x['out_err']['mean']:.4f}/{x['out_err']['p95']:.4f}"
                 for x in (r, r["oracle"], r["codes"], r["uniform"])]
        dens = " / ".join(f"{x['den_err']['mean']:.3f}"
                          for x in (r, r["oracle"], r["codes"], r["uniform"]))
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
    print(f"\ncodes top-k recall vs exact top-k per KV group (k = {rc['k_rows']}, rows outside "
          "sink/window): " + "  ".join(f"@{k} {val:.3f}" for k, val in rc["codes"].items()))


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
    for b, label, style in (("oracle", "oracle top-k", "--"), ("codes", "codes top-k", "-."),
                            ("uniform", "uniform sampling", ":")):
        ax.plot([r["density"] for r in rr], [r[b]["out_err"]["mean"] for r in rr], style,
                marker=".", label=label)
    vv = [v for v in res["variants"] if v["predictor"] == "oracle"]
    ax.scatter([v["density"] for v in vv], [v["out_err"]["mean"] for v in vv], marker="*", s=40,
               zorder=3, label="vAttention, exact-score predictor")
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
    p.add_argument("--key-bits", type=int, default=VAttention.key_bits,
                   help="bits per key element of the predictor's codes")
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
