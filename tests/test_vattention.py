"""vAttention: kernels against the torch reference, the reference against plain attention, and the
(epsilon, delta) guarantee measured on synthetic and on real (captured) attention inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vengine.attention.config import VAttention
from vengine.attention.vattention import vattention_decode
from vengine.eval.activations import DecodeProblem, capture, corpus_text, decode_problem
from vengine.eval.baselines import (oracle_kernels, relative_errors, topk_attention,
                                    uniform_attention)
from vengine.kernels import numba_cpu, reference
from vengine.kernels.common import compact, paged_rows, paged_signatures, sigma_upper_factor
from vengine.kernels.reference import merge_partials


def random_problem(B=2, Hkv=3, G=3, D=64, P=16, n=700, bits=64, seed=0, sharpness=0.0,
                   q_scale=1.0) -> DecodeProblem:
    """Random paged K/V. sharpness > 0 plants rows aligned with each query (heavy hitters)."""
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
    planes = torch.randn(Hkv, D, bits, generator=g)
    k_pool = k.view(B, Hkv, pages, P, D).permute(0, 2, 1, 3, 4).reshape(B * pages, Hkv, P, D)
    v_pool = v.view(B, Hkv, pages, P, D).permute(0, 2, 1, 3, 4).reshape(B * pages, Hkv, P, D)
    lens = torch.tensor([n - 37 * b for b in range(B)])
    return DecodeProblem(q, k_pool.contiguous(), v_pool.contiguous(),
                         torch.arange(B * pages).view(B, pages), lens,
                         paged_signatures(k_pool, planes), planes)


def row_lists(p: DecodeProblem, frac: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    (B, pages), (Hkv, P) = p.block_tables.shape, p.sig.shape[1:3]
    S = pages * P
    mask = (torch.rand(B, Hkv, S, generator=g) < frac) & (torch.arange(S) < p.context_lens[:, None, None])
    return compact(mask, S)


# -- kernels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("Hkv,G,D,P,n", [(1, 1, 64, 16, 333), (2, 4, 32, 64, 1001), (3, 3, 64, 16, 700)])
def test_numba_kernels_match_reference(Hkv, G, D, P, n):
    p = random_problem(Hkv=Hkv, G=G, D=D, P=P, n=n)
    rows, counts = row_lists(p, 0.3)
    logw = torch.rand(rows.shape) * 3
    scale = 1 / math.sqrt(D)
    args = (p.q, p.planes, p.sig, p.block_tables, 3, p.context_lens - 5)
    ref_h, nb_h = reference.hash_scores(*args), numba_cpu.hash_scores(*args)
    torch.testing.assert_close(nb_h, ref_h, rtol=1e-5, atol=1e-4)
    ref_s = reference.row_scores(p.q, p.k_pool, p.block_tables, rows, counts, scale)
    nb_s = numba_cpu.row_scores(p.q, p.k_pool, p.block_tables, rows, counts, scale)
    torch.testing.assert_close(nb_s, ref_s, rtol=1e-5, atol=1e-5)
    for w in (None, logw):
        ref_p = reference.partial_attention(p.q, p.k_pool, p.v_pool, p.block_tables, rows, counts, w, scale)
        nb_p = numba_cpu.partial_attention(p.q, p.k_pool, p.v_pool, p.block_tables, rows, counts, w, scale)
        for a, b in zip(nb_p, ref_p):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_reference_attention_over_all_rows_is_sdpa():
    p = random_problem(Hkv=2, G=4, D=32, P=16, n=333)
    B, Hq, D = p.q.shape
    S = p.block_tables.shape[1] * p.sig.shape[2]
    all_rows = torch.arange(S).expand(B, 2, S)
    rows, counts = compact(all_rows < p.context_lens[:, None, None], S)
    parts = [reference.partial_attention(p.q, p.k_pool, p.v_pool, p.block_tables, rows, counts,
                                         None, 1 / math.sqrt(D))]
    out = merge_partials(parts)
    for b in range(B):
        n = int(p.context_lens[b])
        k = p.k_pool[p.block_tables[b]].transpose(0, 1).reshape(2, -1, D)[:, :n]
        v = p.v_pool[p.block_tables[b]].transpose(0, 1).reshape(2, -1, D)[:, :n]
        ref = F.scaled_dot_product_attention(p.q[b].view(2, 4, 1, D), k[:, None], v[:, None])
        torch.testing.assert_close(out[b], ref.view(Hq, D), rtol=1e-4, atol=1e-5)


def test_hash_scores_match_unpacked_bits():
    p = random_problem(Hkv=2, G=2, D=32, n=100, bits=16)
    sig = paged_rows(p.sig, p.block_tables)  # [B, Hkv, S, nbytes]
    bits = ((sig.long()[..., None] >> torch.arange(8)) & 1).flatten(-2).float() * 2 - 1
    direct = torch.einsum("thd,hdn->thn", p.k_pool.transpose(1, 2).reshape(-1, 2, 32), p.planes) > 0
    assert torch.equal(bits[0].transpose(0, 1)[: direct.shape[0]] > 0, direct[: bits.shape[2]])
    w = torch.einsum("bhgd,hdn->bhgn", p.q.view(2, 2, 2, 32), p.planes)
    naive = torch.einsum("bhgn,bhsn->bhgs", w, bits).reshape(2, 4, -1)
    pos = torch.arange(naive.shape[-1])
    scored = (pos >= 3) & (pos < p.context_lens[:, None] - 5)  # [B, S]
    naive = naive.masked_fill(~scored[:, None], float("-inf"))
    scores = reference.hash_scores(p.q, p.planes, p.sig, p.block_tables, 3, p.context_lens - 5)
    torch.testing.assert_close(scores, naive, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("S", [257, 3000])  # 3000: the two-level scan (blocks of 1024)
def test_compact_matches_nonzero(S):
    mask = torch.rand(3, 4, S) < 0.2
    rows, counts = compact(mask, S)
    for b in range(3):
        for h in range(4):
            expect = mask[b, h].nonzero()[:, 0]
            assert int(counts[b, h]) == len(expect)
            assert torch.equal(rows[b, h, : len(expect)], expect)


@pytest.mark.parametrize("n,alpha,chi2", [(10, 0.025, 2.7004), (75, 0.025, 52.1028), (200, 0.05, 167.3610)])
def test_sigma_upper_factor_matches_chi2_quantiles(n, alpha, chi2):
    # chi2 lower quantiles from scipy.stats.chi2.ppf(alpha, n - 1)
    expect = math.sqrt((n - 1) / chi2)
    assert sigma_upper_factor(torch.tensor([float(n)]), alpha).item() == pytest.approx(expect, rel=0.01)


# -- the estimator --------------------------------------------------------------------------------

CFG = dict(sink=16, window=16, top_k=0.02, base_rate=0.1)
CAPTURED = dict(sink=64, window=64, top_k=0.05, base_rate=0.1)  # captured tests (and on the GPU)


def run(p: DecodeProblem, cfg: VAttention, seed: int, kernels=reference):
    g = torch.Generator().manual_seed(seed)
    return vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens, p.sig,
                             p.planes, cfg, g, kernels)


def test_denominator_estimate_is_unbiased():
    p = random_problem(B=1, Hkv=1, G=2, n=900, q_scale=1.5)
    s, _ = p.exact()
    cfg = VAttention(epsilon=0.3, delta=0.3, **CFG)
    ratios = []
    for seed in range(300):
        r = run(p, cfg, seed)
        d = torch.exp(s - r.log_scale[..., None]).sum(-1)
        ratios.append(r.d_hat / d)
    ratios = torch.stack(ratios)  # [trials, 1, Hq]
    mean, sem = ratios.mean(0), ratios.std(0) / math.sqrt(len(ratios))
    assert (ratios.std(0) > 0.01).all(), "the test needs real sampling noise"
    assert ((mean - 1).abs() < 4 * sem).all(), f"bias: mean ratio {mean}, s.e. {sem}"


def test_max_sample_caps_the_sample_and_the_certificate_reports_it():
    p = random_problem(B=2, n=1500, sharpness=1.2)  # "mixed": the CLT asks for a large sample
    free = VAttention(epsilon=0.02, delta=0.05, **CFG)
    capped = VAttention(epsilon=0.02, delta=0.05, max_sample=0.05, **CFG)
    a, b = run(p, free, 0), run(p, capped, 0)
    n = p.context_lens[:, None].float()
    fixed = 16 + 16 + int(0.02 * 1500)  # sink + window + the group's top-k
    b_max = 0.05 * n + 0.1 * n  # E|second sample| <= c <= the cap; E|pilot| <= base_rate * n
    assert (a.density * n > fixed + b_max).any(), "the uncapped budget must exceed the cap"
    assert (b.density * n <= fixed + b_max + 4 * b_max.sqrt()).all()
    assert b.over_eps.mean() > a.over_eps.mean()


def test_numba_and_torch_kernels_give_the_same_decode():
    p = random_problem(n=600, sharpness=1.5)
    cfg = VAttention(epsilon=0.1, delta=0.1, **CFG)
    a, b = run(p, cfg, 3, reference), run(p, cfg, 3, numba_cpu)
    torch.testing.assert_close(a.out, b.out, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.density, b.density)


def violation_rate(problems, cfg: VAttention, seeds: int):
    viol, out_err, dens = [], [], []
    for i, p in enumerate(problems):
        s, exact_out = p.exact()
        for seed in range(seeds):
            r = run(p, cfg, 1000 * i + seed)
            oe, de = relative_errors(r.out, r.d_hat, exact_out, s, r.log_scale)
            viol.append((de > cfg.epsilon).flatten().float())
            out_err.append(oe.flatten())
            dens.append(r.density.flatten())
    viol = torch.cat(viol)
    return viol.mean().item(), len(viol), torch.cat(out_err).mean().item(), torch.cat(dens).mean().item()


def slack(delta: float, n: int) -> float:
    """Three binomial standard deviations."""
    return 3 * math.sqrt(delta * (1 - delta) / n)


SYNTHETIC = {  # score distributions: few heavy hitters, near-uniform, and both
    "sharp": dict(sharpness=2.5, q_scale=0.5),
    "flat": dict(q_scale=0.3),
    "mixed": dict(sharpness=1.2, q_scale=1.0),
}


@pytest.mark.parametrize("kind", sorted(SYNTHETIC))
@pytest.mark.parametrize("epsilon", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_guarantee_on_synthetic_distributions(kind, epsilon, delta):
    problems = [random_problem(B=4, n=1500, seed=s, **SYNTHETIC[kind]) for s in range(3)]
    cfg = VAttention(epsilon=epsilon, delta=delta, **CFG)
    rate, n, out_err, density = violation_rate(problems, cfg, seeds=4)
    print(f"{kind} eps={epsilon} delta={delta}: violations {rate:.4f} of {n}, "
          f"output error {out_err:.4f}, density {density:.3f}")
    assert rate <= delta + slack(delta, n)


@pytest.fixture(scope="module")
def captured():
    from vengine.models.loader import load_model, resolve_model

    model, tok = load_model(resolve_model(None), torch.device("cpu"), torch.float32)
    ids = tok.encode(corpus_text())[:4096]
    acts = capture(model, ids, keep_queries=8)
    g = torch.Generator().manual_seed(7)
    Hkv, D = acts[0].k.shape[1:]
    return [decode_problem(a, torch.randn(Hkv, D, 64, generator=g)) for a in acts]


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_guarantee_on_captured_activations(captured, epsilon, delta):
    cfg = VAttention(epsilon=epsilon, delta=delta, **CAPTURED)
    rate, n, out_err, density = violation_rate(captured, cfg, seeds=1)
    print(f"captured eps={epsilon} delta={delta}: violations {rate:.4f} of {n} (head, query), "
          f"output error {out_err:.4f}, density {density:.3f}")
    assert rate <= delta + slack(delta, n)


def equal_density_errors(problems, cfg: VAttention, oracle: bool) -> dict[str, float]:
    """Mean relative output error of vAttention and of top-k alone and uniform sampling alone at
    the density vAttention reached (rows per KV head, i.e. equal bytes)."""
    errs = {"vattention": [], "top-k": [], "uniform": []}
    for i, p in enumerate(problems):
        s, exact_out = p.exact()
        kernels = reference
        if oracle:  # the predictor returns the true scores: vAttention(oracle top-k)
            kernels = oracle_kernels(reference, s)
        r = run(p, cfg, i, kernels)
        density = r.density.mean().item()
        errs["vattention"].append(relative_errors(r.out, r.d_hat, exact_out, s, r.log_scale)[0])
        ls = s.amax(-1)
        out, d = topk_attention(p, s, density, cfg.sink, cfg.window, ls, use_hash=not oracle)
        errs["top-k"].append(relative_errors(out, d, exact_out, s, ls)[0])
        out, d = uniform_attention(p, s, density, cfg.sink, cfg.window, ls,
                                   torch.Generator().manual_seed(i))
        errs["uniform"].append(relative_errors(out, d, exact_out, s, ls)[0])
    return {k: torch.cat([e.flatten() for e in v]).mean().item() for k, v in errs.items()}


@pytest.mark.slow
def test_vattention_beats_topk_and_uniform_at_equal_density(captured):
    """The paper's complementarity, with an exact top-k predictor (as its oracle-top-k runs)."""
    cfg = VAttention(epsilon=0.1, delta=0.1, sink=64, window=64, top_k=0.05, base_rate=0.02)
    mean = equal_density_errors(captured, cfg, oracle=True)
    print("oracle predictor, mean relative output error at equal density:", mean)
    assert mean["vattention"] < mean["top-k"]
    assert mean["vattention"] < mean["uniform"]


@pytest.mark.slow
@pytest.mark.parametrize("epsilon,delta", [(0.05, 0.05), (0.1, 0.1)])
def test_vattention_with_hash_signatures_beats_topk_and_uniform(captured, epsilon, delta):
    """The same with the shipped hash predictor, against hash top-k alone (which ranks as
    vAttention's top-k does): the sample, drawn by hash score, beats spending its rows on more
    top-k."""
    cfg = VAttention(epsilon=epsilon, delta=delta, **CAPTURED)
    mean = equal_density_errors(captured, cfg, oracle=False)
    print("hash predictor, mean relative output error at equal density:", mean)
    assert mean["vattention"] < mean["top-k"]
    assert mean["vattention"] < mean["uniform"]
