"""vAttention: kernels against the torch reference, the reference against plain attention, and the
(epsilon, delta) guarantee measured on synthetic and on real (captured) attention inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import (CAPTURED, CFG, SYNTHETIC, decode, protocol_mismatches, random_problem,
                     row_lists, slack, violation_rate)

from vengine.attention.config import VAttention
from vengine.eval.baselines import (oracle_kernels, relative_errors, topk_attention,
                                    uniform_attention)
from vengine.kernels import get_kernels, numba_cpu, reference
from vengine.kernels.common import compact, paged_rows, sigma_upper_factor
from vengine.kernels.reference import merge_partials


# -- kernels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["torch", "numba", "triton"])
def test_backends_provide_every_kernel_op(name):
    """Each backend get_kernels names has every KernelBackend op, parameters as the Protocol's."""
    if name == "triton":
        pytest.importorskip("triton")
    backend = get_kernels(torch.device("cpu"), torch.float32, name)
    assert protocol_mismatches(backend) == []
    p = random_problem(B=1, n=100)
    assert protocol_mismatches(oracle_kernels(backend, p.exact()[0])) == []
    ops = {n: getattr(reference, n) for n in ("store_rows", "pick_top", "exact_rows", "finish")}
    bad = protocol_mismatches(SimpleNamespace(**ops, hash_scores=lambda q, planes: q))
    assert "hash_scores(q, planes)" in bad and "pilot_rows: missing" in bad and len(bad) == 7


@pytest.mark.parametrize("Hkv,G,D,P,n", [(1, 1, 64, 16, 333), (2, 4, 32, 64, 1001), (3, 3, 64, 16, 700)])
def test_numba_kernels_match_reference(Hkv, G, D, P, n):
    p = random_problem(Hkv=Hkv, G=G, D=D, P=P, n=n)
    rows, counts = row_lists(p, 0.3)  # the whole context wide
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

def test_denominator_estimate_is_unbiased():
    p = random_problem(B=1, Hkv=1, G=2, n=900, q_scale=1.5)
    s, _ = p.exact()
    cfg = VAttention(epsilon=0.3, delta=0.3, **CFG)
    ratios = []
    for seed in range(300):
        r = decode(p, cfg, seed)
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
    a, b = decode(p, free, 0), decode(p, capped, 0)
    n = p.context_lens[:, None].float()
    fixed = 16 + 16 + int(0.02 * 1500)  # sink + window + the group's top-k
    b_max = 0.05 * n + 0.1 * n  # E|second sample| <= c <= the cap; E|pilot| <= base_rate * n
    assert (a.density * n > fixed + b_max).any(), "the uncapped budget must exceed the cap"
    assert (b.density * n <= fixed + b_max + 4 * b_max.sqrt()).all()
    assert b.over_eps.mean() > a.over_eps.mean()


def test_numba_and_torch_kernels_give_the_same_decode():
    p = random_problem(n=600, sharpness=1.5)
    cfg = VAttention(epsilon=0.1, delta=0.1, **CFG)
    a, b = decode(p, cfg, 3, reference), decode(p, cfg, 3, numba_cpu)
    torch.testing.assert_close(a.out, b.out, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.density, b.density)


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
        r = decode(p, cfg, i, kernels)
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
