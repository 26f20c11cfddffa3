"""vAttention: kernels against the torch reference, the reference against plain attention, and the
(epsilon, delta) guarantee measured on synthetic and on real (captured) attention inputs."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import (CAPTURED, CFG, SYNTHETIC, decode, protocol_mismatches, random_problem,
                     row_lists, slack, violation_rate)

from vengine.attention.config import VAttention
from vengine.attention.vattention import vattention_decode
from vengine.eval.baselines import (oracle_kernels, relative_errors, topk_attention,
                                    uniform_attention)
from vengine.kernels import get_kernels, numba_cpu, reference
from vengine.kernels.common import (compact, decode_keys, encode_pages, group_log_weights,
                                    merge_partials, paged_rows, sigma_upper_factor)


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
    bad = protocol_mismatches(SimpleNamespace(**ops, group_scores=lambda q, codes: q))
    assert "group_scores(q, codes)" in bad and "pilot_rows: missing" in bad and len(bad) == 7


@pytest.mark.parametrize("Hkv,G,D,P,n", [(1, 1, 64, 16, 333), (2, 4, 32, 64, 1001), (3, 3, 64, 16, 700)])
def test_numba_kernels_match_reference(Hkv, G, D, P, n):
    p = random_problem(Hkv=Hkv, G=G, D=D, P=P, n=n)
    rows, counts = row_lists(p, 0.3)  # the whole context wide
    logw = torch.rand(rows.shape) * 3
    scale = 1 / math.sqrt(D)
    args = (p.q, p.codes, p.block_tables, 3, p.context_lens - 5, scale)
    ref_h, nb_h = reference.key_scores(*args), numba_cpu.key_scores(*args)
    torch.testing.assert_close(nb_h, ref_h, rtol=1e-5, atol=1e-4)
    ref_s = reference.row_scores(p.q, p.k_pool, p.block_tables, rows, counts, scale)
    nb_s = numba_cpu.row_scores(p.q, p.k_pool, p.block_tables, rows, counts, scale)
    torch.testing.assert_close(nb_s, ref_s, rtol=1e-5, atol=1e-5)
    for w in (None, logw):
        ref_p = reference.partial_attention(p.q, p.k_pool, p.v_pool, p.block_tables, rows, counts, w, scale)
        nb_p = numba_cpu.partial_attention(p.q, p.k_pool, p.v_pool, p.block_tables, rows, counts, w, scale)
        for a, b in zip(nb_p, ref_p):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_soft_capped_kernels_match_an_explicit_capped_softmax():
    """Gemma 2's cap (cap * tanh(s / cap) on every score): the reference's partials over all
    rows against softmax(cap * tanh(q . k / sqrt(D) / cap)) v written out here, and numba's
    scores, predicted scores and partials against the reference's, with scores well past the
    cap (q scaled up) so that capping changes them."""
    cap = 3.0
    p = random_problem(Hkv=2, G=4, D=32, P=16, n=333, q_scale=4.0)
    B, Hq, D = p.q.shape
    S = p.block_tables.shape[1] * p.k_pool.shape[2]
    rows, counts = compact(torch.arange(S).expand(B, 2, S) < p.context_lens[:, None, None], S)
    scale = 1 / math.sqrt(D)
    part = reference.partial_attention(p.q, p.k_pool, p.v_pool, p.block_tables, rows, counts,
                                       None, scale, softcap=cap)
    out = merge_partials([part])
    for b in range(B):
        n = int(p.context_lens[b])
        k = p.k_pool[p.block_tables[b]].transpose(0, 1).reshape(2, -1, D)[:, :n]
        v = p.v_pool[p.block_tables[b]].transpose(0, 1).reshape(2, -1, D)[:, :n]
        raw = torch.einsum("hgd,hnd->hgn", p.q[b].view(2, 4, D), k) * scale
        assert raw.abs().max() > 3 * cap, "scores must reach past the cap"
        ref = torch.einsum("hgn,hnd->hgd", (cap * torch.tanh(raw / cap)).softmax(-1), v)
        torch.testing.assert_close(out[b], ref.reshape(Hq, D), rtol=1e-4, atol=1e-5)
    uncapped = merge_partials([reference.partial_attention(
        p.q, p.k_pool, p.v_pool, p.block_tables, rows, counts, None, scale)])
    assert (uncapped - out).abs().max() > 0.1, "the cap must change the output"
    some, n_some = row_lists(p, 0.3)
    logw = torch.rand(some.shape) * 3
    args = (p.q, p.codes, p.block_tables, 3, p.context_lens - 5, scale, cap)
    torch.testing.assert_close(numba_cpu.key_scores(*args), reference.key_scores(*args),
                               rtol=1e-5, atol=1e-4)
    scored = (p.q, p.k_pool, p.block_tables, some, n_some, scale, None, cap)
    torch.testing.assert_close(numba_cpu.row_scores(*scored), reference.row_scores(*scored),
                               rtol=1e-5, atol=1e-5)
    for w in (None, logw):
        parts = (p.q, p.k_pool, p.v_pool, p.block_tables, some, n_some, w, scale)
        for a, r in zip(numba_cpu.partial_attention(*parts, softcap=cap),
                        reference.partial_attention(*parts, softcap=cap)):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_soft_capped_decode_keeps_the_guarantee():
    """vAttention told the cap meets epsilon against capped exact attention; told nothing (the
    uncapped scores of the same problems) it misses on most heads: the cap reaches every score
    the estimate is built from."""
    problems = [dataclasses.replace(random_problem(B=4, n=1500, seed=s, q_scale=4.0), softcap=3.0)
                for s in range(2)]
    cfg = VAttention(epsilon=0.1, delta=0.1, **CFG)
    rate, n, _, density = violation_rate(problems, cfg, seeds=2)
    assert rate <= 0.1 + slack(0.1, n) and density < 1.0  # sampled, not all read
    blind = violation_rate(problems, cfg, seeds=1,
                           place=lambda p: (p, dataclasses.replace(p, softcap=0.0)))
    assert blind.rate > 0.5, blind


def test_reference_attention_over_all_rows_is_sdpa():
    p = random_problem(Hkv=2, G=4, D=32, P=16, n=333)
    B, Hq, D = p.q.shape
    S = p.block_tables.shape[1] * p.k_pool.shape[2]
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


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_key_codes_round_to_the_nearest_level_of_each_channel(bits):
    """Against a direct per-element quantiser: every decoded key within half a step of the key
    (the step: the channel's range over the page / (2^bits - 1)), levels spanning the range."""
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(5, 2, 16, 32, generator=g) * torch.rand(32, generator=g) * 4
    k[..., 7] += 30  # an outlier channel: its own scale
    codes, scales = encode_pages(k, bits)
    assert codes.shape == (5, 2, 16, bits * 4) and codes.dtype == torch.uint8
    k_hat = decode_keys(codes, scales)
    lo, hi = k.amin(2, keepdim=True), k.amax(2, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    assert ((k_hat - k).abs() <= step / 2 * 1.01 + 1e-2).all()
    levels = torch.round((k_hat - lo) / step)
    assert levels.min() == 0 and levels.max() == 2**bits - 1
    unpacked = [(codes[..., j * 4 + c // 8].long() >> (c % 8)) & 1 for j in range(bits)
                for c in range(32)]
    level = sum(torch.stack(unpacked[j * 32:(j + 1) * 32], -1) << j for j in range(bits))
    assert torch.equal(level.float(), torch.round((k_hat - scales[:, :, 0, None].float())
                                                  / scales[:, :, 1, None].float().clamp(min=1e-6)))


def test_key_scores_are_the_dot_with_the_decoded_keys():
    p = random_problem(Hkv=2, G=2, D=32, n=100)
    k_hat = paged_rows(decode_keys(*p.codes), p.block_tables)  # [B, Hkv, S, D]
    naive = torch.einsum("bhgd,bhsd->bhgs", p.q.view(2, 2, 2, 32), k_hat).reshape(2, 4, -1) * 0.5
    pos = torch.arange(naive.shape[-1])
    scored = (pos >= 3) & (pos < p.context_lens[:, None] - 5)  # [B, S]
    naive = naive.masked_fill(~scored[:, None], float("-inf"))
    scores = reference.key_scores(p.q, p.codes, p.block_tables, 3, p.context_lens - 5, 0.5)
    torch.testing.assert_close(scores, naive, rtol=1e-5, atol=1e-4)


def test_store_rows_encodes_a_page_when_its_last_row_is_written():
    """Decode-style appends, one row per call: a page's codes appear with its last row, equal to
    encoding the full page at once; unfinished pages keep none."""
    P, Hkv, D = 16, 2, 32
    k, v = torch.randn(40, Hkv, D), torch.randn(40, Hkv, D)
    k_pool, v_pool = torch.zeros(4, Hkv, P, D), torch.zeros(4, Hkv, P, D)
    codes = (torch.zeros(4, Hkv, P, 12, dtype=torch.uint8), torch.zeros(4, Hkv, 2, D).half())
    slots = torch.tensor([2 * P + i for i in range(P)] + [0 * P + i for i in range(24)])
    for t in range(40):
        reference.store_rows(k[t:t + 1], v[t:t + 1], slots[t:t + 1], k_pool, v_pool, codes)
        if t == P - 2:
            assert (codes[1][2] == 0).all()
    want = encode_pages(k_pool[[2, 0]], 3)
    assert torch.equal(codes[0][[2, 0]], want[0]) and torch.equal(codes[1][[2, 0]], want[1])
    assert (codes[0][1] == 0).all() and (codes[1][[1, 3]] == 0).all()  # page 1 unfinished


def test_group_weights_sum_the_heads_softmax():
    s = torch.randn(2, 6, 50) * 3
    s[..., :5] = float("-inf")
    w = group_log_weights(s, 2).exp()  # [2, 2, 50]
    assert torch.allclose(w, s.softmax(-1).view(2, 2, 3, 50).sum(2), atol=1e-6)
    assert torch.isinf(group_log_weights(torch.full((1, 2, 4), float("-inf")), 1)).all()


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
    b_max = 0.05 * n + 64  # E|second sample| <= c <= the cap; E|pilot| <= pilot rows
    assert (a.density * n > fixed + b_max).any(), "the uncapped budget must exceed the cap"
    assert (b.density * n <= fixed + b_max + 4 * b_max.sqrt()).all()
    assert b.over_eps.mean() > a.over_eps.mean()


def test_numba_and_torch_kernels_give_the_same_decode():
    p = random_problem(n=600, sharpness=1.5)
    cfg = VAttention(epsilon=0.1, delta=0.1, **CFG)
    a, b = decode(p, cfg, 3, reference), decode(p, cfg, 3, numba_cpu)
    torch.testing.assert_close(a.out, b.out, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.density, b.density)


def test_certificate_reports_a_heavy_row_the_predictor_missed():
    """A planted heavy row whose code is wrong (the predictor ranks it among the lightest):
    the pilot finds it and the certificate says the predictor missed; with its true code, it is
    in the top-k and nothing is reported. The pilot covers the residual (pilot >> n_R / floor),
    so the finding is certain, and the estimate stays exact."""
    p = random_problem(B=1, Hkv=1, G=2, n=300, seed=3)
    heavy, P = 150, p.k_pool.shape[2]
    p.k_pool[heavy // P, 0, heavy % P] = p.q[0, 0] / p.q[0, 0].norm() * 3 * math.sqrt(64)
    cfg = VAttention(epsilon=0.1, delta=0.1, sink=16, window=16, top_k=8, pilot=20000)
    honest = dataclasses.replace(p, codes=encode_pages(p.k_pool, 3))
    codes, scales = encode_pages(p.k_pool, 3)
    codes[heavy // P, 0, heavy % P] ^= 0xFF  # every level mirrored: the key read as its opposite
    lying = dataclasses.replace(p, codes=(codes, scales))
    s, out = p.exact()
    assert s[0, 0].softmax(-1)[heavy] > 0.5, "the planted row must be heavy"
    r_honest, r_lying = decode(honest, cfg, 0), decode(lying, cfg, 0)
    assert r_honest.missed.sum() == 0
    assert r_lying.missed[0, 0] == 1
    torch.testing.assert_close(r_lying.out, out, rtol=1e-4, atol=1e-4)


def test_pilot_is_a_count_so_density_falls_with_the_context():
    """A fixed pilot and a fractional top-k: the share of rows read shrinks as the context grows
    (a fractional pilot kept it at its fraction at every length)."""
    cfg = VAttention(epsilon=0.25, delta=0.25, sink=16, window=16, top_k=0.02, pilot=64, seed=0)
    density = [decode(random_problem(B=1, n=n, seed=1, **SYNTHETIC["sharp"]), cfg, 0)
               .density.mean().item() for n in (1000, 4000, 16000)]
    assert density[0] > density[1] > density[2]


@pytest.mark.parametrize("kind", sorted(SYNTHETIC))
@pytest.mark.parametrize("epsilon", [0.1, 0.25])
def test_output_guarantee_on_synthetic_distributions(kind, epsilon):
    problems = [random_problem(B=4, n=1500, seed=s, **SYNTHETIC[kind]) for s in range(3)]
    cfg = VAttention(epsilon=epsilon, delta=epsilon, guarantee="output", **CFG)
    rate, n, out_err, density = violation_rate(problems, cfg, seeds=4)
    print(f"{kind} output eps=delta={epsilon}: violations {rate:.4f} of {n}, "
          f"output error {out_err:.4f}, density {density:.3f}")
    assert rate <= epsilon + slack(epsilon, n)


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
@pytest.mark.parametrize("guarantee", ["denominator", "output"])
@pytest.mark.parametrize("epsilon", [0.05, 0.25])
def test_guarantee_on_captured_activations(captured, guarantee, epsilon):
    delta = epsilon
    cfg = VAttention(epsilon=epsilon, delta=delta, guarantee=guarantee, **CAPTURED)
    rate, n, out_err, density = violation_rate(captured, cfg, seeds=1)
    print(f"captured {guarantee} eps={epsilon} delta={delta}: violations {rate:.4f} of {n} (head, query), "
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
        out, d = topk_attention(p, s, density, cfg.sink, cfg.window, ls, predicted=not oracle)
        errs["top-k"].append(relative_errors(out, d, exact_out, s, ls)[0])
        out, d = uniform_attention(p, s, density, cfg.sink, cfg.window, ls,
                                   torch.Generator().manual_seed(i))
        errs["uniform"].append(relative_errors(out, d, exact_out, s, ls)[0])
    return {k: torch.cat([e.flatten() for e in v]).mean().item() for k, v in errs.items()}


@pytest.mark.slow
def test_vattention_beats_topk_and_uniform_at_equal_density(captured):
    """The paper's complementarity, with an exact top-k predictor (as its oracle-top-k runs)."""
    cfg = VAttention(epsilon=0.1, delta=0.1, sink=64, window=64, top_k=0.05, pilot=128)
    mean = equal_density_errors(captured, cfg, oracle=True)
    print("oracle predictor, mean relative output error at equal density:", mean)
    assert mean["vattention"] < mean["top-k"]
    assert mean["vattention"] < mean["uniform"]


@pytest.mark.slow
@pytest.mark.parametrize("epsilon,delta", [(0.1, 0.1)])  # 0.05 too: 57 s more, same verdict
def test_vattention_with_key_codes_beats_topk_and_uniform(captured, epsilon, delta):
    """The same with the shipped predictor, against its top-k alone (which ranks as
    vAttention's top-k does): the sample, drawn by predicted weight, beats spending its rows on
    more top-k."""
    cfg = VAttention(epsilon=epsilon, delta=delta, **CAPTURED)
    mean = equal_density_errors(captured, cfg, oracle=False)
    print("key-code predictor, mean relative output error at equal density:", mean)
    assert mean["vattention"] < mean["top-k"]
    assert mean["vattention"] < mean["uniform"]


def test_row_cache_changes_where_rows_are_read_not_the_result():
    """Three decode steps of a growing context through a RowCache (the engine keeps one for a
    host pool on a GPU): each step's output, estimate and density equal the uncached decode's
    bit for bit (same draws), and from the second step on most predicted top-k rows come from
    the cache, the rows a step repeats from the step before."""
    from vengine.offload.row_cache import RowCache

    cfg = VAttention(epsilon=0.1, delta=0.1, sink=16, window=16, top_k=0.05, pilot=32, seed=0)
    p = random_problem(B=2, Hkv=2, G=2, D=32, P=16, n=600, sharpness=4.0)
    cache = RowCache(1, 2, 2, 128, 32, torch.float32, torch.device("cpu"))
    cache.begin_step([0, 1])
    for step in range(3):
        lens = p.context_lens - 40 + 20 * step  # the same sequences, 20 tokens on each step
        q = p.q + 0.05 * step  # the query drifts a little, as a model's does
        args = (q, p.k_pool, p.v_pool, p.block_tables, lens, p.codes, cfg)
        plain = vattention_decode(*args, torch.Generator().manual_seed(step), reference)
        cached = vattention_decode(*args, torch.Generator().manual_seed(step), reference,
                                   row_cache=cache, layer=0)
        for name in ("out", "d_hat", "density", "over_eps"):
            assert torch.equal(getattr(plain, name), getattr(cached, name)), (step, name)
        hit = cached.reused.sum() / cached.predicted.sum()
        assert plain.reused is None and (hit == 0 if step == 0 else hit > 0.5), (step, hit)
