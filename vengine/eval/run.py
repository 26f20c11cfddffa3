"""`vengine eval`: accuracy of full attention, vAttention and sparse baselines on RULER-style
tasks, plus the (epsilon, delta) calibration, from one command.

Modes run on the same cases with one loaded model: full attention; vAttention at each epsilon
(delta fixed), with the hash predictor and optionally the exact scores as predictor (the paper's
vAttention(oracle top-k)); oracle top-k, hash top-k and uniform sampling at the mean density each
vAttention setting reached. Calibration: captured Q/K/V of a haystack prompt, observed relative
denominator error against the specified epsilon, and their correlation.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vengine.attention.config import VAttention
from vengine.engine.sampling import SamplingParams


@dataclass(frozen=True)
class EvalSettings:
    tasks: tuple[str, ...]
    context: int = 2048
    cases: int = 5
    seed: int = 0
    epsilons: tuple[float, ...] = (0.05, 0.1, 0.2)
    delta: float = 0.1
    haystack: str = "essay"
    max_new_tokens: int = 24
    sink: int = 64
    window: int = 64
    top_k: float = 0.05
    base_rate: float = 0.02
    baselines: bool = True
    predictors: tuple[str, ...] = ("hash",)  # "hash" (shipped) and/or "oracle" (exact scores)
    calibration_epsilons: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)


def vattention_settings(s: EvalSettings, epsilon: float) -> VAttention:
    return VAttention(epsilon=epsilon, delta=s.delta, sink=s.sink, window=s.window, top_k=s.top_k,
                      base_rate=s.base_rate, seed=s.seed)


def _prompt_ids(llm, case) -> list[int]:
    messages = getattr(case, "messages", None)
    if messages:
        return llm.chat_ids(list(messages))
    return llm.tokenizer.encode(case.prompt)


def run_mode(llm, attention: Any, cases: list, s: EvalSettings) -> dict[str, Any]:
    """Generate every case greedily under one attention mode; accuracy per task and density."""
    from vengine.eval.tasks import score

    engine = llm.with_attention(attention)
    params = SamplingParams(max_new_tokens=s.max_new_tokens)
    requests = [(i, _prompt_ids(llm, c), params) for i, c in enumerate(cases)]
    scores: dict[str, list[float]] = {}
    density_sum, steps = 0.0, 0
    for i, completion in engine.completions(requests):
        scores.setdefault(cases[i].task, []).append(score(cases[i], completion.text))
        n = completion.stats.get("sparse_steps", 0)
        density_sum += completion.stats.get("density", 1.0) * n
        steps += n
    accuracy = {t: 100 * statistics.mean(v) for t, v in sorted(scores.items())}
    # over decode steps: an answer that ends at its first token (prefill, no decode step) has none
    return {"accuracy": accuracy, "mean_accuracy": statistics.mean(accuracy.values()),
            "density": density_sum / steps if steps else 1.0}


def calibration(llm, s: EvalSettings, cases: list) -> dict[str, Any]:
    """Observed relative denominator error vs epsilon on captured activations of the first case
    (its last 8 positions as decode queries, every layer and head), at calibration_epsilons: a
    wider range than the modes', as the error is cheap to measure here."""
    from vengine.attention.vattention import vattention_decode
    from vengine.eval.activations import capture, decode_problem
    from vengine.eval.baselines import relative_errors
    from vengine.kernels import reference

    acts = capture(llm.model, _prompt_ids(llm, cases[0]), keep_queries=8)
    g = torch.Generator().manual_seed(s.seed)
    Hkv, D = acts[0].k.shape[1:]
    dev = acts[0].k.device
    problems = [decode_problem(a, torch.randn(Hkv, D, 64, generator=g).to(dev)) for a in acts]
    rows = []
    for eps in s.calibration_epsilons:
        cfg = vattention_settings(s, eps)
        errs, viol = [], []
        for i, p in enumerate(problems):
            sc, out = p.exact()
            r = vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens, p.sig,
                                  p.planes, cfg, torch.Generator(dev).manual_seed(i), reference)
            _, d_err = relative_errors(r.out, r.d_hat, out, sc, r.log_scale)
            errs.append(d_err.flatten())
            viol.append((d_err > eps).float().flatten())
        e = torch.cat(errs).cpu()
        rows.append({"epsilon": eps, "mean_error": e.mean().item(),
                     "p95_error": e.quantile(0.95).item(),
                     "violation_rate": torch.cat(viol).mean().item()})
    eps_t = torch.tensor([r["epsilon"] for r in rows])
    corr = {k: torch.corrcoef(torch.stack([eps_t, torch.tensor([r[k] for r in rows])]))[0, 1].item()
            for k in ("mean_error", "p95_error")} if len(rows) > 1 else {}
    return {"delta": s.delta, "rows": rows, "correlation": corr}


def run_eval(llm, s: EvalSettings) -> dict[str, Any]:
    from vengine.eval.baselines import OracleVAttention, SparseBaseline
    from vengine.eval.tasks import make_cases

    cases = [c for t in s.tasks for c in make_cases(t, llm.tokenizer, s.context, s.cases, s.seed,
                                                     haystack=s.haystack)]
    results: dict[str, Any] = {"settings": s.__dict__ | {"tasks": list(s.tasks)}, "modes": {}}
    results["modes"]["full"] = run_mode(llm, "full", cases, s)
    for eps in s.epsilons:
        for predictor in s.predictors:
            spec = vattention_settings(s, eps)
            method, tag = "vattention", f"eps={eps}"
            if predictor == "oracle":
                spec, method = OracleVAttention(spec), "vattention (oracle top-k)"
                tag = f"oracle eps={eps}"
            mode = run_mode(llm, spec, cases, s)
            results["modes"][f"vattention {tag}"] = mode | {"method": method, "epsilon": eps}
            if s.baselines:
                for kind in ("oracle_topk", "hash_topk", "uniform"):
                    spec = SparseBaseline(kind, min(mode["density"], 1.0), s.sink, s.window,
                                          seed=s.seed)
                    results["modes"][f"{kind} @ {tag}"] = run_mode(llm, spec, cases, s) | {
                        "method": kind, "epsilon": eps}
    results["calibration"] = calibration(llm, s, cases)
    return results


def print_table(results: dict[str, Any]) -> None:
    modes = results["modes"]
    tasks = list(next(iter(modes.values()))["accuracy"])
    head = f"{'mode':<26}" + "".join(f"{t[:14]:>15}" for t in tasks) + f"{'mean':>8}{'density':>9}"
    print(head)
    for name, m in modes.items():
        print(f"{name:<26}" + "".join(f"{m['accuracy'][t]:15.1f}" for t in tasks)
              + f"{m['mean_accuracy']:8.1f}{m['density']:9.3f}")
    cal = results["calibration"]
    print(f"calibration (delta={cal['delta']}): " + ", ".join(
        f"eps {r['epsilon']}: mean err {r['mean_error']:.4f}, p95 {r['p95_error']:.4f}, "
        f"violations {r['violation_rate']:.3f}" for r in cal["rows"]))
    print("correlation(epsilon, observed error): " + ", ".join(
        f"{k} {v:.3f}" for k, v in cal["correlation"].items()))


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for m in results["modes"].values():
        by_method.setdefault(m.get("method", "full"), []).append((m["density"], m["mean_accuracy"]))
    for method, pts in by_method.items():
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("mean density (rows attended / context)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs density")
    ax.legend()
    acc_png = out_dir / "eval_accuracy_vs_density.png"
    fig.tight_layout()
    fig.savefig(acc_png, dpi=120)
    cal = results["calibration"]
    fig, ax = plt.subplots(figsize=(5, 4))
    eps = [r["epsilon"] for r in cal["rows"]]
    ax.plot(eps, [r["mean_error"] for r in cal["rows"]], marker="o", label="mean")
    ax.plot(eps, [r["p95_error"] for r in cal["rows"]], marker="s", label="95th percentile")
    ax.plot(eps, eps, "k--", label="y = epsilon")
    corr = cal["correlation"].get("mean_error", float("nan"))
    ax.set_title(f"observed |D_hat - D| / D vs epsilon (r = {corr:.3f})")
    ax.set_xlabel("specified epsilon")
    ax.set_ylabel("observed relative error")
    ax.legend()
    cal_png = out_dir / "eval_eps_calibration.png"
    fig.tight_layout()
    fig.savefig(cal_png, dpi=120)
    plt.close("all")
    return [acc_png, cal_png]


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
