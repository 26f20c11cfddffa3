"""What the kernel and estimator tests share (test_vattention, test_triton, test_gpu): random paged
decode problems, row lists, one decode step, the (epsilon, delta) guarantee's violation rate, and
the structural check of a kernel backend against base.KernelBackend. And the batch tests'
(test_batch, test_distributed) `vengine generate` killed mid-run."""

from __future__ import annotations

import inspect
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from vengine.attention.config import VAttention
from vengine.attention.vattention import DecodeResult, vattention_decode
from vengine.eval.activations import DecodeProblem
from vengine.eval.baselines import relative_errors
from vengine.kernels import reference
from vengine.kernels.base import KernelBackend
from vengine.kernels.common import compact, encode_pages

CFG = dict(sink=16, window=16, top_k=0.02, pilot=64)
CAPTURED = dict(sink=64, window=64, top_k=0.05, pilot=128)  # captured tests (and on the GPU)
SYNTHETIC = {  # score distributions: few heavy hitters, near-uniform, and both
    "sharp": dict(sharpness=2.5, q_scale=0.5),
    "flat": dict(q_scale=0.3),
    "mixed": dict(sharpness=1.2, q_scale=1.0),
}


def paged(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Rows x [B, Hkv, pages * P, D] laid out in a pool [B * pages, Hkv, P, D] at the pages of
    tables [B, pages]."""
    (B, pages), (Hkv, D) = tables.shape, (x.shape[1], x.shape[-1])
    pool = torch.empty(B * pages, Hkv, x.shape[2] // pages, D)
    pool[tables] = x.view(B, Hkv, pages, -1, D).transpose(1, 2)
    return pool


def random_problem(B=2, Hkv=3, G=3, D=64, P=16, n=700, bits=3, seed=0, sharpness=0.0,
                   q_scale=1.0) -> DecodeProblem:
    """Random K/V on consecutive pages; context lengths n, n - 37, ... sharpness > 0 plants rows
    aligned with each query (heavy hitters)."""
    g = torch.Generator().manual_seed(seed)
    pages = -(-n // P)
    k = torch.randn(B, Hkv, pages * P, D, generator=g)
    v = torch.randn(B, Hkv, pages * P, D, generator=g)
    q = torch.randn(B, Hkv * G, D, generator=g) * q_scale
    if sharpness:
        for b in range(B):
            rows = torch.randint(0, n, (Hkv, 8), generator=g)
            for h in range(Hkv):
                k[b, h, rows[h]] = sharpness * q[b, h * G] / q[b, h * G].norm() * math.sqrt(D)
    tables = torch.arange(B * pages).view(B, pages)
    k_pool, v_pool = paged(k, tables), paged(v, tables)
    lens = torch.tensor([n - 37 * b for b in range(B)])
    return DecodeProblem(q, k_pool, v_pool, tables, lens, encode_pages(k_pool, bits))


def shuffled_problem(B=2, Hkv=2, G=4, D=32, P=16, n=300, bits=3, seed=0) -> DecodeProblem:
    """Random K/V over shuffled pages; context lengths n, n - 37, ..."""
    g = torch.Generator().manual_seed(seed)
    pages = -(-n // P)
    k = torch.randn(B, Hkv, pages * P, D, generator=g)
    v = torch.randn(B, Hkv, pages * P, D, generator=g)
    tables = torch.randperm(B * pages, generator=g).view(B, pages)
    k_pool, v_pool = paged(k, tables), paged(v, tables)
    return DecodeProblem(torch.randn(B, Hkv * G, D, generator=g), k_pool, v_pool, tables,
                         torch.tensor([n - 37 * b for b in range(B)]),
                         encode_pages(k_pool, bits))


def row_lists(p: DecodeProblem, frac: float, width: int | None = None, seed: int = 1):
    """Sorted random rows of each context, at most width (None: the whole context) per list, in
    [B, Hkv, width] buffers, and their counts; the last (b, h) gets none."""
    g = torch.Generator().manual_seed(seed)
    (B, pages), (Hkv, P) = p.block_tables.shape, p.k_pool.shape[1:3]
    S = pages * P
    width = S if width is None else width
    mask = torch.rand(B, Hkv, S, generator=g) < frac
    mask &= torch.arange(S) < p.context_lens[:, None, None]
    mask &= mask.cumsum(-1) <= width
    mask[-1, -1] = False
    return compact(mask, width)


def decode(p: DecodeProblem, cfg: VAttention, seed: int,
           kernels: KernelBackend = reference) -> DecodeResult:
    """One vAttention decode step of p (its scores capped as p.softcap says), its draws from a
    generator on p's device seeded seed."""
    g = torch.Generator(p.q.device).manual_seed(seed)
    return vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens, p.codes,
                             cfg, g, kernels, softcap=p.softcap)


class Violations(NamedTuple):
    rate: float  # share of (query, head) whose guaranteed error (denominator or output) > epsilon
    n: int  # how many (query, head)
    out_err: float  # mean relative output error
    density: float  # mean share of rows read


def violation_rate(problems, cfg: VAttention, seeds: int, kernels: KernelBackend = reference,
                   place: Callable[[DecodeProblem], tuple[DecodeProblem, DecodeProblem]]
                   | None = None) -> Violations:
    """Decode each problem with `seeds` seeds (1000 * problem + seed) and measure against exact
    attention. place(p) -> (the problem to take exact attention of, the one to decode) (default:
    p for both)."""
    viol, out_err, dens = [], [], []
    for i, p in enumerate(problems):
        exact, run_on = place(p) if place else (p, p)
        s, exact_out = exact.exact()
        for seed in range(seeds):
            r = decode(run_on, cfg, 1000 * i + seed, kernels)
            oe, de = relative_errors(r.out.float(), r.d_hat, exact_out, s, r.log_scale)
            err = de if cfg.guarantee == "denominator" else oe
            viol.append((err > cfg.epsilon).flatten().float())
            out_err.append(oe.flatten())
            dens.append(r.density.flatten())
    v = torch.cat(viol)
    return Violations(v.mean().item(), len(v), torch.cat(out_err).mean().item(),
                      torch.cat(dens).mean().item())


def slack(delta: float, n: int) -> float:
    """Three binomial standard deviations."""
    return 3 * math.sqrt(delta * (1 - delta) / n)


KERNEL_OPS = tuple(n for n, f in vars(KernelBackend).items()
                   if callable(f) and not n.startswith("_"))


def protocol_mismatches(backend) -> list[str]:
    """The KernelBackend ops that backend lacks, or whose parameters differ from the Protocol's
    (names, kinds and defaults, in order; a backend may add parameters with defaults after
    them, as triton's partial_attention adds chunk)."""
    def params(ps):
        return [(p.name, p.kind, p.default) for p in ps]

    bad = []
    for name in KERNEL_OPS:
        fn = getattr(backend, name, None)
        if fn is None:
            bad.append(f"{name}: missing")
            continue
        want = list(inspect.signature(getattr(KernelBackend, name)).parameters.values())[1:]
        got = list(inspect.signature(fn).parameters.values())
        extra = got[len(want):]
        if params(got[:len(want)]) != params(want) or any(p.default is p.empty for p in extra):
            bad.append(f"{name}{inspect.signature(fn)}")
    return bad


def kill_9_mid_run(argv: list[str], out: Path, total: int, torn_id: str, **popen) -> list[dict]:
    """Run `vengine ARGV` as a process and SIGKILL it once `out` holds two rows: the rows it
    left (fewer than `total`, or the kill missed the run), then a torn row for `torn_id`
    appended, as a kill inside write() would leave it."""
    proc = subprocess.Popen([sys.executable, "-m", "vengine", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **popen)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = [json.loads(line) for line in out.read_text().splitlines()]
    assert 2 <= len(partial) < total, "the kill must land mid-run for this test to mean much"
    with open(out, "a") as f:
        f.write(f'{{"id": {json.dumps(torn_id)}, "text": "half')
    return partial
