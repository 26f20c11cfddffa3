"""`vengine eval`: accuracy of full attention, vAttention and sparse baselines on RULER-style
tasks, plus the (epsilon, delta) calibration, from one command.

Modes run on the same cases with one loaded model: full attention; vAttention at each epsilon
(delta = epsilon unless fixed) and guarantee, with the shipped predictor (key codes) and
optionally the exact scores as predictor (the paper's vAttention(oracle top-k)); oracle top-k,
predictor top-k and uniform sampling at the mean density a vAttention setting reached. Every
mode's accuracy is compared with full attention's on the same cases: the paired difference and
its 95% interval. Calibration: captured Q/K/V of a haystack prompt, the observed relative error
(of the denominator or the output, per guarantee) against the specified epsilon, violation rates
and their correlation.
"""

from __future__ import annotations

import json
import math
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
    epsilons: tuple[float, ...] = (0.05, 0.1, 0.25)
    delta: float | None = None  # None: delta = epsilon
    guarantees: tuple[str, ...] = ("denominator",)
    haystack: str = "essay"
    max_new_tokens: int = 24
    sink: int = 64
    window: int = 64
    top_k: float = 0.02
    pilot: int = 256
    baselines: tuple[float, ...] = ()  # the epsilons whose density the baselines run at
    predictors: tuple[str, ...] = ("codes",)  # "codes" (shipped) and/or "oracle" (exact scores)
    calibration_epsilons: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)
    prompt: str = "chat"  # "chat" (the model's template) or "completion" (base models: RULER's
    # answer prefix after the question, no template)


def vattention_settings(s: EvalSettings, epsilon: float, guarantee: str = "denominator"
                        ) -> VAttention:
    return VAttention(epsilon=epsilon, delta=epsilon if s.delta is None else s.delta,
                      sink=s.sink, window=s.window, top_k=s.top_k, pilot=s.pilot,
                      guarantee=guarantee, seed=s.seed, exact_below=0)  # always sparse


def _prompt_ids(llm, case, style: str = "chat") -> list[int]:
    if style == "completion":
        return llm.tokenizer.encode(case.completion)
    messages = getattr(case, "messages", None)
    if messages:
        return llm.chat_ids(list(messages))
    return llm.tokenizer.encode(case.prompt)


def run_mode(llm, attention: Any, cases: list, s: EvalSettings) -> dict[str, Any]:
    """Generate every case greedily under one attention mode: per-case scores (in case order),
    accuracy per task, density and the certificate's rates over decode steps."""
    from vengine.eval.tasks import score

    engine = llm.with_attention(attention)
    params = SamplingParams(max_new_tokens=s.max_new_tokens)
    requests = [(i, _prompt_ids(llm, c, s.prompt), params) for i, c in enumerate(cases)]
    per_case = [0.0] * len(cases)
    sums = {"density": 0.0, "certificate_violation_rate": 0.0, "predictor_miss_rate": 0.0}
    steps = 0
    for i, completion in engine.completions(requests):
        per_case[i] = score(cases[i], completion.text)
        n = completion.stats.get("sparse_steps", 0)
        for k in sums:
            sums[k] += completion.stats.get(k, 1.0 if k == "density" else 0.0) * n
        steps += n
    by_task: dict[str, list[float]] = {}
    for c, x in zip(cases, per_case):
        by_task.setdefault(c.task, []).append(x)
    accuracy = {t: 100 * statistics.mean(v) for t, v in sorted(by_task.items())}
    # over decode steps: an answer that ends at its first token (prefill, no decode step) has none
    rates = {k: v / steps if steps else (1.0 if k == "density" else 0.0) for k, v in sums.items()}
    return {"accuracy": accuracy, "mean_accuracy": statistics.mean(accuracy.values()),
            "scores": per_case, **rates}


def paired(mode: dict[str, Any], full: dict[str, Any]) -> dict[str, float]:
    """Mean of the per-case accuracy differences mode - full (points) and a 95% interval
    (normal, over the cases: tasks have equal case counts, so this is the mean over tasks)."""
    d = [100 * (a - b) for a, b in zip(mode["scores"], full["scores"])]
    mean = statistics.mean(d)
    if len(d) < 2:  # no spread to estimate: no interval
        return {"diff": mean, "lo": None, "hi": None, "n": len(d)}
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    return {"diff": mean, "lo": mean - half, "hi": mean + half, "n": len(d)}


def calibration(llm, s: EvalSettings, cases: list) -> dict[str, Any]:
    """Observed relative error vs epsilon on captured activations of the first case (its last 8
    positions as decode queries, every layer and head), at calibration_epsilons (delta =
    epsilon unless fixed), for each guarantee: the denominator's |D_hat - D| / D, the output's
    |o_hat - o| / |o|. A wider range than the modes', as the error is cheap to measure here."""
    from vengine.attention.vattention import vattention_decode
    from vengine.eval.activations import capture, decode_problem
    from vengine.eval.baselines import relative_errors
    from vengine.kernels import reference

    acts = capture(llm.model, _prompt_ids(llm, cases[0], s.prompt), keep_queries=8)
    problems = [decode_problem(a, softcap=llm.model.config.attn_softcap or 0.0) for a in acts]
    exact = [p.exact() for p in problems]
    dev = acts[0].k.device
    result: dict[str, Any] = {}
    for guarantee in s.guarantees:
        rows = []
        for eps in s.calibration_epsilons:
            cfg = vattention_settings(s, eps, guarantee)
            errs, dens = [], []
            for i, (p, (sc, out)) in enumerate(zip(problems, exact)):
                r = vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens,
                                      p.codes, cfg, torch.Generator(dev).manual_seed(i), reference,
                                      softcap=p.softcap)
                o_err, d_err = relative_errors(r.out, r.d_hat, out, sc, r.log_scale)
                errs.append((d_err if guarantee == "denominator" else o_err).flatten())
                dens.append(r.density.mean().item())
            e = torch.cat(errs).cpu()
            rows.append({"epsilon": eps, "delta": cfg.delta, "mean_error": e.mean().item(),
                         "p95_error": e.quantile(0.95).item(),
                         "violation_rate": (e > eps).float().mean().item(),
                         "density": statistics.mean(dens)})
        eps_t = torch.tensor([r["epsilon"] for r in rows])
        corr = {k: torch.corrcoef(torch.stack([eps_t, torch.tensor([r[k] for r in rows])]))[0, 1]
                .item() for k in ("mean_error", "p95_error")} if len(rows) > 1 else {}
        result[guarantee] = {"rows": rows, "correlation": corr}
    return result


def run_eval(llm, s: EvalSettings) -> dict[str, Any]:
    from vengine.eval.baselines import OracleVAttention, SparseBaseline
    from vengine.eval.tasks import make_cases

    cases = [c for t in s.tasks for c in make_cases(t, llm.tokenizer, s.context, s.cases, s.seed,
                                                     haystack=s.haystack)]
    results: dict[str, Any] = {"settings": s.__dict__ | {"tasks": list(s.tasks)}, "modes": {}}
    modes = results["modes"]
    modes["full"] = full = run_mode(llm, "full", cases, s)
    for guarantee in s.guarantees:
        for eps in s.epsilons:
            for predictor in s.predictors:
                spec = vattention_settings(s, eps, guarantee)
                method = "vattention" + (" (output)" if guarantee == "output" else "")
                tag = f"eps={eps}" + (" output" if guarantee == "output" else "")
                if predictor == "oracle":
                    spec, method = OracleVAttention(spec), method + " (oracle top-k)"
                    tag = "oracle " + tag
                mode = run_mode(llm, spec, cases, s)
                modes[f"vattention {tag}"] = mode | {"method": method, "epsilon": eps}
                if eps in s.baselines and predictor == "codes" and guarantee == s.guarantees[0]:
                    for kind in ("oracle_topk", "predictor_topk", "uniform"):
                        base = SparseBaseline(kind, min(mode["density"], 1.0), s.sink, s.window,
                                              seed=s.seed)
                        modes[f"{kind} @ {tag}"] = run_mode(llm, base, cases, s) | {
                            "method": kind, "epsilon": eps}
    for name, mode in modes.items():
        if name != "full":
            mode["vs_full"] = paired(mode, full)
    results["calibration"] = calibration(llm, s, cases)
    return results


def print_table(results: dict[str, Any]) -> None:
    modes = results["modes"]
    tasks = list(next(iter(modes.values()))["accuracy"])
    print(f"{'mode':<34}" + "".join(f"{t[:14]:>15}" for t in tasks)
          + f"{'mean':>7}{'vs full [95% CI]':>23}{'density':>9}{'miss':>7}{'cert':>7}")
    for name, m in modes.items():
        vs = m.get("vs_full")
        paired_txt = "" if not vs else f"{vs['diff']:+.1f}" + (
            f" [{vs['lo']:+.1f}, {vs['hi']:+.1f}]" if vs["lo"] is not None else " (1 case)")
        print(f"{name:<34}" + "".join(f"{m['accuracy'][t]:15.1f}" for t in tasks)
              + f"{m['mean_accuracy']:7.1f}{paired_txt:>23}{m['density']:9.3f}"
              + f"{m['predictor_miss_rate']:7.3f}{m['certificate_violation_rate']:7.3f}")
    for guarantee, cal in results["calibration"].items():
        print(f"calibration ({guarantee}): " + ", ".join(
            f"eps {r['epsilon']} (delta {r['delta']}): mean err {r['mean_error']:.4f}, "
            f"p95 {r['p95_error']:.4f}, violations {r['violation_rate']:.3f}, "
            f"density {r['density']:.3f}" for r in cal["rows"]))
        print(f"correlation(epsilon, observed error) ({guarantee}): " + ", ".join(
            f"{k} {v:.3f}" for k, v in cal["correlation"].items()))


def plot(results: dict[str, Any], out_dir: Path, stem: str = "eval") -> list[Path]:
    """Accuracy against density and epsilon against observed error, as <stem>_*.png (the --out
    file's stem, so that runs sharing a folder keep their own plots)."""
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
    acc_png = out_dir / f"{stem}_accuracy_vs_density.png"
    fig.tight_layout()
    fig.savefig(acc_png, dpi=120)
    fig, ax = plt.subplots(figsize=(5, 4))
    top = max(r["epsilon"] for c in results["calibration"].values() for r in c["rows"])
    for guarantee, cal in results["calibration"].items():
        eps = [r["epsilon"] for r in cal["rows"]]
        corr = cal["correlation"].get("mean_error", float("nan"))
        ax.plot(eps, [r["mean_error"] for r in cal["rows"]], marker="o",
                label=f"{guarantee}: mean (r = {corr:.3f})")
        ax.plot(eps, [r["p95_error"] for r in cal["rows"]], marker="s", linestyle=":",
                label=f"{guarantee}: 95th percentile")
    ax.plot([0, top], [0, top], "k--", label="y = epsilon")
    ax.set_title("observed relative error vs epsilon")
    ax.set_xlabel("specified epsilon (delta = epsilon)")
    ax.set_ylabel("observed relative error")
    ax.legend(fontsize=7)
    cal_png = out_dir / f"{stem}_eps_calibration.png"
    fig.tight_layout()
    fig.savefig(cal_png, dpi=120)
    plt.close("all")
    return [acc_png, cal_png]


def provenance(llm, argv: list[str]) -> dict[str, str]:
    """Device, date, commit ('' outside a git checkout) and command of a run, so that a result
    file says what produced it."""
    import datetime
    import platform
    import shlex
    import subprocess

    dev = llm.config.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor()
                                                                       or platform.machine())
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False, cwd=Path(__file__).resolve().parent)
    return {"device": f"{name} (torch {torch.__version__})", "date": str(datetime.date.today()),
            "commit": git.stdout.strip(), "command": "vengine " + shlex.join(argv)}


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
