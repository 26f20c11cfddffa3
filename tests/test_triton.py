"""Triton kernels against the torch reference; on CPU they run under the Triton interpreter."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to test")

from helpers import decode, row_lists, shuffled_problem  # noqa: E402

from vengine.attention.config import VAttention  # noqa: E402
from vengine.eval.activations import DecodeProblem  # noqa: E402
from vengine.kernels import reference  # noqa: E402
from vengine.kernels import triton as triton_gpu  # noqa: E402  (the GPU kernels)
from vengine.kernels.common import (  # noqa: E402
    Fp8Rows, accuracy_targets, decode_keys, fp8_quantise, mask_range)
from vengine.offload.uva import uva_view  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA GPU: nowhere to run the kernels",
                allow_module_level=True)
DEV = "cpu" if INTERPRET else "cuda"


def err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| where b is finite; a and b must be infinite at the same places."""
    assert torch.equal(a.isinf(), b.isinf()), "-inf entries differ"
    return (a - b).abs()[b.isfinite()]


def check(name, out, ref, ref_lowp=None, rtol=1e-5, atol=1e-5):
    """fp32: close to the reference. Low precision: error vs the fp32 reference at most twice the
    reference's own error on the same low-precision inputs, plus 1e-6."""
    e = err(out.cpu(), ref)
    if ref_lowp is None:
        bound = atol + rtol * ref.abs()[ref.isfinite()]
    else:
        bound = 2 * err(ref_lowp, ref).max() + 1e-6
    assert bool((e <= bound).all()), \
        f"{name}: max abs diff {e.max():.3g}, mean {e.mean():.3g} (bound {bound.max():.3g})"


def cast(p: DecodeProblem, dtype, dev) -> tuple:
    """q, k_pool, v_pool in dtype and block_tables, on dev."""
    return (p.q.to(dev, dtype), p.k_pool.to(dev, dtype), p.v_pool.to(dev, dtype),
            p.block_tables.to(dev))


@pytest.mark.parametrize("P", [16, 64])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("Hkv,G", [(1, 1), (2, 4), (3, 3)])
def test_kernels_match_reference(Hkv, G, D, P):
    p = shuffled_problem(Hkv=Hkv, G=G, D=D, P=P)
    rows, counts = row_lists(p, 0.5, width=199)
    logw = torch.rand(rows.shape, generator=torch.Generator().manual_seed(2)) * 3 - 1
    scale = 1 / math.sqrt(D)
    ref32 = cast(p, torch.float32, "cpu")
    rd, cd = rows.to(DEV), counts.to(DEV)
    for dtype in (torch.float32, torch.bfloat16):
        q, kp, vp, bt = cast(p, dtype, DEV)
        lowp = (q.cpu(), kp.cpu(), vp.cpu(), bt.cpu()) if dtype != torch.float32 else None

        def compare(name, fn, args, tri, **tol):
            """fn(*fp32 inputs, *args) vs tri (tuples); fn on low-precision inputs: the bound."""
            ref = fn(*ref32, *args)
            ref_lowp = fn(*lowp, *args) if lowp else [None] * len(ref)
            for i, (t, r, rl) in enumerate(zip(tri, ref, ref_lowp)):
                check(f"{name}[{i}] {dtype}", t, r, rl, **tol)

        compare("row_scores", lambda q, k, v, bt, *a: (reference.row_scores(q, k, bt, *a),),
                (rows, counts, scale), (triton_gpu.row_scores(q, kp, bt, rd, cd, scale),))
        for w in (None, logw.to(dtype)):
            wd = None if w is None else w.to(DEV)
            compare(f"partial_attention (m, l, acc) logw={w is not None}",
                    reference.partial_attention, (rows, counts, w, scale),
                    triton_gpu.partial_attention(q, kp, vp, bt, rd, cd, wd, scale, chunk=128),
                    rtol=1e-4)
        # given the rows' scores, K is not read: a pool of NaN keys gives the same answer
        s = triton_gpu.row_scores(q, kp, bt, rd, cd, scale)
        compare("partial_attention from scores", reference.partial_attention,
                (rows, counts, logw, scale),
                triton_gpu.partial_attention(q, torch.full_like(kp, math.nan), vp, bt, rd, cd,
                                             logw.to(DEV), scale, scores=s, chunk=128), rtol=1e-4)


@pytest.mark.parametrize("P,D,Hkv,G,bits", [(16, 64, 2, 3, 3), (64, 128, 1, 7, 3),
                                             (16, 128, 2, 1, 2), (64, 64, 3, 3, 4)])
def test_key_scores_match_reference(P, D, Hkv, G, bits):
    """q . k_hat * scale of the keys decoded from their codes over shuffled pages, -inf outside
    lo <= s < hi[b]: the reference's on the same f32 or bf16 queries."""
    p = shuffled_problem(Hkv=Hkv, G=G, D=D, P=P, bits=bits)
    hi, scale = p.context_lens - 5, 1 / math.sqrt(D)
    codes = tuple(c.to(DEV) for c in p.codes)
    for dtype in (torch.float32, torch.bfloat16):
        q = p.q.to(dtype)
        ref = reference.key_scores(q, p.codes, p.block_tables, 3, hi, scale)
        tri = triton_gpu.key_scores(q.to(DEV), codes, p.block_tables.to(DEV), 3, hi.to(DEV),
                                    scale)
        check(f"key_scores {dtype}", tri, ref, atol=1e-4)


@pytest.mark.parametrize("P,Hkv,G,cap", [(16, 2, 3, 0.0), (64, 1, 7, 0.0), (16, 3, 1, 2.0),
                                         (16, 2, 4, 0.0)])
def test_group_scores_match_reference(P, Hkv, G, cap):
    """The predictor's ranking (each group's log weights of the key scores, masked to the
    ranked range) against the reference's: a sequence shorter than a page (no coded rows: every
    score -inf), a cap that binds, groups of 1 to 7 heads."""
    p = shuffled_problem(Hkv=Hkv, G=G, D=64, P=P)
    lens = p.context_lens.clone()
    lens[-1] = P - 3  # nothing coded yet
    hi, rank_hi, scale = lens // P * P, lens - P, 1 / math.sqrt(64)
    q = p.q * 4.0
    ref = reference.group_scores(q, p.codes, p.block_tables, hi, 5, rank_hi, scale, cap)
    tri = triton_gpu.group_scores(q.to(DEV), tuple(c.to(DEV) for c in p.codes),
                                  p.block_tables.to(DEV), hi.to(DEV), 5, rank_hi.to(DEV), scale,
                                  cap)
    assert ref[:-1].isfinite().any() and not ref[-1].isfinite().any()
    check("group_scores", tri, ref, atol=1e-4)


def test_soft_capped_kernels_match_reference():
    """Gemma 2's cap on every score, in the three kernels that compute scores: row_scores,
    partial_attention (from K, and from the capped scores) and key_scores, against the
    reference's with the same cap; q scaled so that scores reach well past it."""
    cap, D = 3.0, 64
    p = shuffled_problem(Hkv=2, G=4, D=D, P=16)
    q = (p.q * 4.0).to(DEV)
    kp, vp, bt = p.k_pool.to(DEV), p.v_pool.to(DEV), p.block_tables.to(DEV)
    rows, counts = row_lists(p, 0.5, width=199)
    rd, cd, scale = rows.to(DEV), counts.to(DEV), 1 / math.sqrt(D)
    logw = torch.rand(rows.shape, generator=torch.Generator().manual_seed(2)) * 3 - 1
    ref_s = reference.row_scores(p.q * 4.0, p.k_pool, p.block_tables, rows, counts, scale,
                                 softcap=cap)
    assert ref_s[ref_s.isfinite()].abs().max() > 0.9 * cap, "the cap must bind"
    s = triton_gpu.row_scores(q, kp, bt, rd, cd, scale, softcap=cap)
    check("capped row_scores", s, ref_s)
    ref_p = reference.partial_attention(p.q * 4.0, p.k_pool, p.v_pool, p.block_tables, rows,
                                        counts, logw, scale, softcap=cap)
    for name, got in (("from K", triton_gpu.partial_attention(q, kp, vp, bt, rd, cd, logw.to(DEV),
                                                              scale, softcap=cap, chunk=128)),
                      ("from scores", triton_gpu.partial_attention(
                          q, torch.full_like(kp, math.nan), vp, bt, rd, cd, logw.to(DEV), scale,
                          scores=s, softcap=cap, chunk=128))):
        for i, (t, r) in enumerate(zip(got, ref_p)):
            check(f"capped partial_attention {name} [{i}]", t, r, rtol=1e-4)
    hi = p.context_lens - 5
    ref_h = reference.key_scores(p.q * 4.0, p.codes, p.block_tables, 3, hi, scale, cap)
    tri_h = triton_gpu.key_scores(q, tuple(c.to(DEV) for c in p.codes), bt, 3, hi.to(DEV), scale,
                                  cap)
    check("capped key_scores", tri_h, ref_h, atol=1e-4)


def selection_problem(S: int):
    """Predicted log weights (-inf off the candidates), picks, context lengths and draws."""
    g = torch.Generator().manual_seed(S)
    B, Hkv = 3, 2
    lens = torch.tensor([S, S - 1000 if S > 1000 else S - 100, 40])  # the last: all fixed
    picked = (torch.rand(B, Hkv, S + 1, generator=g) < 0.1).to(torch.int8)
    scores = mask_range(torch.randn(B, Hkv, S, generator=g) * 30 + 50, 16, lens - 24)
    u = torch.rand(2, B, Hkv, S, generator=g)
    return picked, scores, lens, u


@pytest.mark.parametrize("S,width", [(300, 300), (9000, 9000), (9000, 700)])  # 9000: 3 splits
def test_row_selection_matches_reference(S, width):
    """exact_rows, pilot_rows and second_rows give the reference's lists: same rows in the same
    order, the same counts (also when a list is cut at the buffer width), and the same values
    beside them; proposal_params the reference's."""
    picked, scores, lens, u = selection_problem(S)
    n_r = (lens[:, None].float() * 0.8).expand(3, 2)
    prop_ref = (scores, reference.proposal_params(scores, picked), n_r)
    prop_tri = (scores.to(DEV), triton_gpu.proposal_params(scores.to(DEV), picked.to(DEV)),
                n_r.to(DEV))
    torch.testing.assert_close(prop_tri[1].cpu(), prop_ref[1], rtol=1e-5, atol=1e-5, msg="lse")
    size = torch.tensor([[30.0, 300.0], [1e4, 0.0], [50.0, 50.0]])
    c = torch.tensor([[100.0, 5.0], [0.0, 1e9], [20.0, 2000.0]])
    d = [t.to(DEV) for t in (picked, u, size, c, lens)]
    for name, ref, tri in (
        ("exact", reference.exact_rows(picked, lens, S, 16, 24, width),
         triton_gpu.exact_rows(d[0], d[4], S, 16, 24, width)),
        ("pilot", reference.pilot_rows(picked, u, prop_ref, size, lens, 16, 24, width),
         triton_gpu.pilot_rows(d[0], d[1], prop_tri, d[2], d[4], 16, 24, width)),
        ("second", reference.second_rows(picked, u, prop_ref, size, c, lens, 16, 24, width),
         triton_gpu.second_rows(d[0], d[1], prop_tri, d[2], d[3], d[4], 16, 24, width)),
    ):
        (rows, counts, *aux), (rows_t, counts_t, *aux_t) = ref, (t.cpu() for t in tri)
        assert torch.equal(counts, counts_t), f"{name}: counts {counts} vs {counts_t}"
        assert counts.max() > 0 and (width == S or counts.max() == width)
        for b in range(3):
            for h in range(2):
                k = int(counts[b, h])
                assert torch.equal(rows[b, h, :k], rows_t[b, h, :k]), f"{name} ({b}, {h})"
                for a, a_t in zip(aux, aux_t):
                    torch.testing.assert_close(a_t[b, h, :k], a[b, h, :k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("S,k_max", [(300, 40), (9000, 700)])
def test_pick_top_matches_reference(S, k_max):
    """Each sequence's k_rows best finite scores, as the reference's sorted top-k picks them:
    k_rows below k_max, equal to it, above the finite candidates, and 0; with tied scores,
    exactly k_rows, none below a row left out."""
    _, scores, _, _ = selection_problem(S)
    scores = torch.cat([scores, scores[:1]])
    k_rows = torch.tensor([k_max // 2, k_max, k_max, 0])  # the third has 0 finite scores
    ref = reference.pick_top(scores, k_max, k_rows)
    tri = triton_gpu.pick_top(scores.to(DEV), k_max, k_rows.to(DEV)).cpu()
    assert torch.equal(tri[..., :S], ref[..., :S])
    assert ref[0, :, :S].sum(-1).tolist() == [k_max // 2] * 2 and ref[2, :, :S].sum() == 0

    ties = (scores / 20).round()  # a few distinct values: the k-th largest is tied
    tri = triton_gpu.pick_top(ties.to(DEV), k_max, k_rows.to(DEV)).cpu()[..., :S].bool()
    finite = ties > float("-inf")
    assert torch.equal(tri.sum(-1), torch.minimum(k_rows[:, None], finite.sum(-1)))
    low = ties.masked_fill(~tri, float("inf")).amin(-1)  # the lowest picked
    high = ties.masked_fill(tri | ~finite, float("-inf")).amax(-1)  # the highest not picked
    assert (low >= high).all()


@pytest.mark.parametrize("G,W", [(1, 40), (4, 300), (3, 700)])
def test_budget_and_finish_match_reference(G, W):
    """pilot_budget and finish against the reference, pilot sizes 0, 1, 2 and larger included,
    a cap that binds, heavy pilot rows (missed), and the output guarantee's deviations dev_b."""
    g = torch.Generator().manual_seed(G * W)
    B, Hkv, D = 3, 2, 32
    Hq = Hkv * G
    count_b = torch.tensor([[0, 1], [2, W // 2], [W, W - 3]])
    s_b = torch.randn(B, Hq, W, generator=g) * 3
    s_b[torch.arange(W) >= count_b.repeat_interleave(G, 1)[..., None]] = -math.inf
    pr_b = torch.rand(B, Hkv, W, generator=g) / 500 + 1e-5
    pa_b = torch.clamp(pr_b * 300, max=1.0)
    m_f, l_f = torch.randn(B, Hq, generator=g), torch.rand(B, Hq, generator=g) * 20 + 1
    cap = torch.tensor([[5000.0, 1e12], [1e12, 80.0], [1e12, 1e12]])
    n_r = torch.tensor([[1e6, 1e6], [1e6, 8.0], [1e6, 1e6]])  # (1, 1): the cap takes every row
    args = (s_b, count_b, pa_b, pr_b, m_f, l_f, cap, n_r, 0.05, 0.1)
    ref = reference.pilot_budget(*args)
    never_all_in = reference.pilot_budget(*args[:7], n_r.clamp(min=1e6), *args[8:])[4]
    assert not torch.equal(never_all_in, ref[4])  # a head over its cap with every row in: certified
    dev_b = torch.rand(B, Hq, W, generator=g) * 2
    ref_dev = reference.pilot_budget(*args, dev_b)
    assert not torch.allclose(ref_dev[2], ref[2])  # the deviations move the budget
    # each sequence's own (epsilon, delta), NaN: the call's; row b as if called with its pair
    target = accuracy_targets([(None, None), (0.2, 0.01), (0.01, None)])
    ref_t = reference.pilot_budget(*args, None, target)
    for b, (eps, delta) in enumerate([(0.05, 0.1), (0.2, 0.01), (0.01, 0.1)]):
        alone = reference.pilot_budget(*args[:8], eps, delta)
        for name, r, t in zip(("m", "d_f", "c", "logw_b", "over_eps", "missed"), alone, ref_t):
            torch.testing.assert_close(t[b], r[b], msg=f"{name} of sequence {b}")
    assert not torch.allclose(ref_t[2][1:], ref[2][1:])  # the targets move the budget
    live = torch.arange(W) < count_b[..., None]
    for dv, refs, tg in ((None, ref, None), (dev_b, ref_dev, None), (None, ref_t, target)):
        tri = triton_gpu.pilot_budget(*(a.to(DEV) if torch.is_tensor(a) else a for a in args),
                                      None if dv is None else dv.to(DEV),
                                      None if tg is None else tg.to(DEV))
        for name, r, t in zip(("m", "d_f", "c", "logw_b", "over_eps", "missed"), refs, tri):
            r, t = (x.masked_fill(~live, 0) if name == "logw_b" else x for x in (r, t.cpu()))
            torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-5,
                                       msg=f"{name} (dev_b {dv is not None}, {tg is not None})")
        for flag in refs[4:]:  # the cap binds, a pilot row is heavy: somewhere, not everywhere
            assert (flag == 1).any() and (flag == 0).any()

    m, d_f = ref[:2]
    parts = [(torch.randn(B, Hq, generator=g), torch.rand(B, Hq, generator=g) * 9 + 1,
              torch.randn(B, Hq, D, generator=g)) for _ in range(3)]
    parts[2][0][0, 0] = -math.inf  # an empty sample
    ref = reference.finish(*parts, m, d_f)
    dev = [tuple(t.to(DEV) for t in part) for part in parts]
    tri = triton_gpu.finish(*dev, m.to(DEV), d_f.to(DEV))
    for name, r, t in zip(("out", "d_hat"), ref, tri):
        torch.testing.assert_close(t.cpu(), r, rtol=1e-5, atol=1e-6, msg=name)


def code_levels(codes: torch.Tensor, D: int) -> torch.Tensor:
    """Each element's level (0 .. 2^bits - 1) in packed codes [..., P, bits * D / 8]."""
    return decode_keys(codes, torch.stack([torch.zeros(D), torch.ones(D)]))


def store_steps(g: torch.Generator, P: int, pages: int) -> tuple[torch.Tensor, list]:
    """Two sequences on shuffled pages (tables [2, pages / 2]) and three steps' slots: prefill
    chunks of whole pages, a chunk completing a page begun a step before batched behind another
    sequence's chunk, and a decode step."""
    tables = torch.randperm(pages, generator=g).view(2, pages // 2)

    def slots(seq: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return tables[seq, pos // P] * P + pos % P

    return tables, [slots(0, 0, 37),  # pages 0, 1 of sequence 0
                    torch.cat([slots(1, 0, 31), slots(0, 37, 71)]),  # page 0 of 1; 2, 3 of 0
                    torch.cat([slots(1, 31, 32), slots(0, 71, 72)])]  # decode: page 1 of 1


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 3), (torch.bfloat16, 4)])
def test_store_rows_match_reference(dtype, bits):
    """Over three steps on shuffled pages, K/V rows land in the slots given (other slots
    untouched) and each page whose last row a step writes gets the reference's scales, and its
    codes (a level off at a rounding tie at most, on a tiny share): prefill chunks of whole pages
    (encoded from k), a chunk completing a page begun a step before, batched behind another
    sequence's chunk, and a decode step (both encoded from the pool). v is a view of a fused
    projection. (k is in the pools' dtype: the interpreter truncates float32 to bfloat16.)"""
    g = torch.Generator().manual_seed(bits)
    Hkv, D, P, pages = 3, 32, 16, 10
    tables, steps = store_steps(g, P, pages)
    pools = [(torch.full((pages, Hkv, P, D), 7.0, dtype=dtype),
              torch.full((pages, Hkv, P, D), 7.0, dtype=dtype),
              torch.full((pages, Hkv, P, bits * D // 8), 0xA5, dtype=torch.uint8),
              torch.full((pages, Hkv, 2, D), 3.0, dtype=torch.float16)) for _ in range(2)]
    ref, dev = pools[0], [t.to(DEV) for t in pools[1]]
    for i, step in enumerate(steps):
        kv = torch.randn(len(step), Hkv, 2 * D, generator=g).to(dtype)
        k, v = kv[..., :D].contiguous(), kv[..., D:]
        reference.store_rows(k, v, step, ref[0], ref[1], (ref[2], ref[3]))
        triton_gpu.store_rows(k.to(DEV), v.to(DEV), step.to(DEV), dev[0], dev[1], (dev[2], dev[3]))
        for name, r, t in zip(("k", "v", "scales"), (ref[0], ref[1], ref[3]),
                              (dev[0], dev[1], dev[3])):
            assert torch.equal(t.cpu(), r), f"{name} after step {i}"
        off = (code_levels(dev[2].cpu(), D) - code_levels(ref[2], D)).abs()
        assert off.max() <= 1 and (off > 0).float().mean() < 1e-3, f"codes after step {i}"
    encoded = torch.zeros(pages, dtype=torch.bool)
    encoded[torch.cat([tables[0, :4], tables[1, :2]])] = True
    assert torch.equal((ref[3] != 3.0).flatten(1).any(1), encoded)
    assert (ref[0] == 7).any()


def fp8_pools(pages: int, Hkv: int, P: int, D: int, dev) -> tuple[Fp8Rows, Fp8Rows]:
    """Empty K and V pools of e4m3 rows and bfloat16 scales, the unwritten scales poisoned."""
    return tuple(Fp8Rows(torch.zeros(pages, Hkv, P, D, dtype=torch.float8_e4m3fn, device=dev),
                         torch.full((pages, Hkv, P), 3.0, dtype=torch.bfloat16, device=dev))
                 for _ in range(2))


def test_fp8_quantise_keeps_each_row_to_e4m3_precision():
    """fp8_quantise: every element within half an e4m3 step of its value (2^-4 relative for
    normals, 2^-10 of the row's scale below them) at any magnitude, zero rows stay zero, and
    each row's largest value uses the top of the e4m3 range (the scale rounds up: none clips)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 4, 128, generator=g) * torch.logspace(-6, 3, 64)[:, None, None]
    x[3, 1] = 0
    q, scale = fp8_quantise(x.to(torch.bfloat16))
    back = q.float() * scale.float()[..., None]
    xb = x.to(torch.bfloat16).float()
    bound = torch.maximum(xb.abs() * 2.0**-4, scale.float()[..., None] * 2.0**-10) * 1.001
    assert bool(((back - xb).abs() <= bound).all())
    assert torch.equal(back[3, 1], torch.zeros(128))
    assert (q.float().abs().amax(-1)[xb.abs().amax(-1) > 0] > 400).all()


def test_fp8_rows_match_reference():
    """FP8 KV (Fp8Rows): over the three steps of test_store_rows_match_reference, the e4m3 rows
    and scales are the reference's bit for bit (also the rounding ties to even that carry into
    the exponent) and the codes are encoded from the keys as stored; row_scores and
    partial_attention over them, some pages read from GPU copies whose host rows are NaN, equal
    the reference's over the dequantised rows."""
    g = torch.Generator().manual_seed(11)
    Hkv, D, P, pages, bits = 2, 32, 16, 10, 3
    tables, steps = store_steps(g, P, pages)
    ref, dev = fp8_pools(pages, Hkv, P, D, "cpu"), fp8_pools(pages, Hkv, P, D, DEV)
    codes = [(torch.zeros(pages, Hkv, P, bits * D // 8, dtype=torch.uint8),
              torch.zeros(pages, Hkv, 2, D, dtype=torch.float16)) for _ in range(2)]
    codes[1] = tuple(c.to(DEV) for c in codes[1])
    for i, step in enumerate(steps):
        kv = (torch.randn(len(step), Hkv, 2 * D, generator=g) * 40).to(torch.bfloat16)
        k, v = kv[..., :D].contiguous(), kv[..., D:]
        reference.store_rows(k, v, step, *ref, codes[0])
        triton_gpu.store_rows(k.to(DEV), v.to(DEV), step.to(DEV), *dev, codes[1])
        for name, r, t in (("k", ref[0], dev[0]), ("v", ref[1], dev[1])):
            assert torch.equal(t.rows.cpu().view(torch.uint8), r.rows.view(torch.uint8)), \
                f"{name} rows after step {i}"
            assert torch.equal(t.scale.cpu(), r.scale), f"{name} scales after step {i}"
        assert torch.equal(codes[1][1].cpu(), codes[0][1]), f"code scales after step {i}"
        off = (code_levels(codes[1][0].cpu(), D) - code_levels(codes[0][0], D)).abs()
        assert off.max() <= 1 and (off > 0).float().mean() < 1e-3, f"codes after step {i}"
    assert (ref[0].scale == 3.0).any() and (ref[0].scale != 3.0).any()

    q = torch.randn(2, Hkv * 3, D, generator=g)
    bt = tables.to(torch.int32)
    rows = torch.stack([torch.stack([torch.randperm(72 if b == 0 else 32, generator=g)[:30]
                                     for _ in range(Hkv)]) for b in range(2)]).to(torch.int32)
    counts = torch.tensor([[30, 21], [9, 30]], dtype=torch.int32)
    logw = torch.randn(rows.shape, generator=g)
    hot_pages = [int(tables[0, 0]), int(tables[1, 1])]
    slot_of = torch.full((pages,), -1, dtype=torch.int32)
    slot_of[hot_pages] = torch.tensor([1, 0], dtype=torch.int32)
    k_hot, v_hot = (torch.zeros(2, Hkv, P, D, dtype=torch.float8_e4m3fn) for _ in range(2))
    k_hot[[1, 0]], v_hot[[1, 0]] = ref[0].rows[hot_pages], ref[1].rows[hot_pages]
    for t in dev:
        t.rows[hot_pages] = float("nan")
    resident = (slot_of.to(DEV), k_hot.to(DEV), v_hot.to(DEV))
    args = (bt, rows, counts)
    dargs = tuple(a.to(DEV) for a in args)
    check("fp8 row_scores", triton_gpu.row_scores(q.to(DEV), dev[0], *dargs, 0.2, resident),
          reference.row_scores(q, ref[0], *args, 0.2), rtol=1e-4)
    want = reference.partial_attention(q, *ref, *args, logw, 0.2)
    got = triton_gpu.partial_attention(q.to(DEV), *dev, *dargs, logw.to(DEV), 0.2, resident,
                                       chunk=16)
    for name, t, r in zip("mla", got, want):
        check(f"fp8 partial_attention {name}", t, r, rtol=1e-4, atol=1e-4)


def test_store_rows_without_codes_writes_only_kv():
    """Exact attention writes through the same kernel with codes None: the rows land, nothing
    else changes, also for slots that end a page."""
    g = torch.Generator().manual_seed(3)
    T, Hkv, D, P, pages = 21, 2, 16, 8, 6
    k, v = torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    slots = torch.randperm(pages * P, generator=g)[:T]
    assert (slots % P == P - 1).any()
    pools = [(torch.full((pages, Hkv, P, D), 7.0), torch.full((pages, Hkv, P, D), 7.0))
             for _ in range(2)]
    reference.store_rows(k, v, slots, *pools[0])
    dev = [t.to(DEV) for t in pools[1]]
    triton_gpu.store_rows(k.to(DEV), v.to(DEV), slots.to(DEV), *dev)
    for name, r, t in zip(("k", "v"), pools[0], dev):
        assert torch.equal(t.cpu(), r), name
    assert (pools[0][0] != 7).any() and (pools[0][0] == 7).any()


def test_resident_pages_are_read_from_their_gpu_copy():
    """With some pages copied to a 'GPU' pool (slot_of >= 0) and their host rows poisoned with NaN,
    row_scores and partial_attention still equal the reference on the clean pool; store_rows
    writes a row of a resident page to both copies."""
    p = shuffled_problem(B=2, Hkv=2, G=4, D=32, P=16, n=300)
    rows, counts = row_lists(p, 0.5, width=199)
    q, kp, vp, bt = cast(p, torch.float32, DEV)
    resident_pages = [int(p.block_tables[b, i]) for b, i in ((0, 0), (1, -1), (0, 5))]
    slot_of = torch.full((kp.shape[0],), -1, dtype=torch.int32)
    slot_of[resident_pages] = torch.tensor([2, 0, 1], dtype=torch.int32)
    k_hot, v_hot = torch.zeros(3, *kp.shape[1:]), torch.zeros(3, *kp.shape[1:])
    k_hot[[2, 0, 1]], v_hot[[2, 0, 1]] = p.k_pool[resident_pages], p.v_pool[resident_pages]
    kp[resident_pages], vp[resident_pages] = float("nan"), float("nan")
    resident = (slot_of.to(DEV), k_hot.to(DEV), v_hot.to(DEV))
    scale = 0.125
    ref = reference.row_scores(p.q, p.k_pool, p.block_tables, rows, counts, scale)
    check("row_scores", triton_gpu.row_scores(q, kp, bt, rows.to(DEV), counts.to(DEV), scale,
                                              resident), ref)
    ref = reference.partial_attention(p.q, p.k_pool, p.v_pool, p.block_tables, rows, counts, None,
                                      scale)
    tri = triton_gpu.partial_attention(q, kp, vp, bt, rows.to(DEV), counts.to(DEV), None, scale,
                                       resident, chunk=64)
    for name, t, r in zip("mla", tri, ref):
        check(f"partial_attention {name}", t, r)

    k, v = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    slots = torch.tensor([resident_pages[0] * 16 + 3, int(p.block_tables[1, 1]) * 16])
    triton_gpu.store_rows(k.to(DEV), v.to(DEV), slots.to(DEV), kp, vp, resident=resident)
    assert torch.equal(resident[1][2, :, 3].cpu(), k[0])
    assert torch.equal(kp[resident_pages[0], :, 3].cpu(), k[0])
    assert torch.equal(resident[2][2, :, 3].cpu(), v[0])
    assert torch.equal(kp[int(p.block_tables[1, 1]), :, 0].cpu(), k[1])


def test_split_sizes_agree():
    """One split per list, several, and splits past the counts give the same partials."""
    p = shuffled_problem(B=1, Hkv=1, G=2, n=200)
    rows, counts = row_lists(p, 0.6, width=151)
    args = (*cast(p, torch.float32, DEV), rows.to(DEV), counts.to(DEV), None, 0.125)
    base = triton_gpu.partial_attention(*args, chunk=256)
    for chunk in (16, 32):
        for a, b in zip(triton_gpu.partial_attention(*args, chunk=chunk), base):
            check(f"chunk {chunk}", a, b.cpu(), rtol=1e-5)


@pytest.mark.parametrize("guarantee", ["denominator", "output"])
def test_decode_matches_reference_kernels(guarantee):
    p = shuffled_problem(B=2, Hkv=2, G=2, D=32, P=16, n=300)
    cfg = VAttention(epsilon=0.1, delta=0.1, sink=8, window=8, top_k=0.05, pilot=16,
                     guarantee=guarantee)
    fields = (getattr(p, f.name) for f in dataclasses.fields(p))
    p = DecodeProblem(*(tuple(t.to(DEV) for t in x) if isinstance(x, tuple)
                        else x.to(DEV) if isinstance(x, torch.Tensor) else x for x in fields))
    a, b = decode(p, cfg, 3, reference), decode(p, cfg, 3, triton_gpu)  # the same draws
    for name in ("density", "over_eps", "missed"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    check("decode output", b.out, a.out.cpu(), rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="needs a CUDA GPU with compiled kernels (TRITON_INTERPRET unset or 0)")
def test_partial_attention_reads_pinned_host_pool_over_uva():
    p = shuffled_problem(Hkv=2, G=4, D=64, P=16, n=300)
    rows, counts = row_lists(p, 0.5, width=199)
    args = (rows, counts, torch.rand(rows.shape, generator=torch.Generator().manual_seed(2)), 0.125)
    k16, v16 = p.k_pool.half().pin_memory(), p.v_pool.half().pin_memory()
    k_uva, v_uva = uva_view(k16), uva_view(v16)
    assert k_uva.is_cuda and k_uva.data_ptr() == k16.data_ptr()
    outs = triton_gpu.partial_attention(p.q.half().cuda(), k_uva, v_uva, p.block_tables.cuda(),
                                        *(a.cuda() for a in args[:3]), 0.125, chunk=64)
    refs = reference.partial_attention(*cast(p, torch.float32, "cpu"), *args)
    refs_lowp = reference.partial_attention(p.q.half(), k16, v16, p.block_tables, *args)
    for name, a, r, rl in zip(["m", "l", "acc"], outs, refs, refs_lowp):
        check(f"uva {name}", a, r, rl)


@pytest.mark.parametrize("fp8", [False, True])
def test_row_cache_reads_the_rows_held_and_holds_the_new_list(fp8):
    """Two steps over overlapping row lists through a RowCache: the second step's result is
    the pool's attention over its rows although every row it held from the first is NaN in the
    pool (so each one was read from the cache), the rows it did not hold come from the pool, and
    after commit the cache holds exactly the second list. Triton and the reference alike."""
    from vengine.offload.row_cache import NONE, RowCache

    p = shuffled_problem(Hkv=2, G=4, D=64, P=16, n=300)
    rows1, counts1 = row_lists(p, 0.4, width=150, seed=1)
    rows2, counts2 = row_lists(p, 0.4, width=150, seed=2)
    scale = 0.125
    k_pool, v_pool = p.k_pool.to(DEV), p.v_pool.to(DEV)
    if fp8:
        k_pool, v_pool = (Fp8Rows(*fp8_quantise(x)) for x in (k_pool, v_pool))
    tables, q = p.block_tables.to(DEV), p.q.to(DEV)
    want = reference.partial_attention(q, k_pool, v_pool, tables, rows2.to(DEV),
                                       counts2.to(DEV), None, scale)
    for backend in (reference, triton_gpu):
        cache = RowCache(1, 2, 2, 160, 64, torch.float8_e4m3fn if fp8 else torch.float32, DEV)
        cache.begin_step([7, 8])
        for rows, counts in ((rows1, counts1), (rows2, counts2)):
            rows, counts = rows.to(DEV), counts.to(DEV)
            held = cache.lookup(0, rows, counts)
            if rows is not rows1:
                hits = held[0] >= 0
                assert 0 < hits.sum() < (torch.arange(150, device=DEV) < counts[..., None]).sum()
                k_nan, v_nan = (_poison(x, tables, rows, hits) for x in (k_pool, v_pool))
                got = backend.partial_attention(q, k_nan, v_nan, tables, rows, counts, None,
                                                scale, cache=held)
            else:
                assert (held[0] < 0).all()  # nothing held yet
                backend.partial_attention(q, k_pool, v_pool, tables, rows, counts, None, scale,
                                          cache=held)
            cache.commit(0, rows, counts)
        for name, a, r in zip(["m", "l", "acc"], got, want):
            check(f"{backend.__name__} cached {name}", a, r)
        live = torch.arange(150) < counts2[..., None]
        assert torch.equal(cache.rows[0, :, :, :150].cpu(), torch.where(live, rows2, NONE))
        cache.begin_step([7, 9])  # position 1 holds another sequence now: its rows go
        assert (cache.rows[0, 1] == NONE).all() and (cache.rows[0, 0, :, :1] != NONE).all()


def _poison(pool, tables, rows, hits):
    """A copy of pool with the rows listed where hits set to NaN (e4m3's NaN, 0x7f, for
    Fp8Rows: their scales stay the pool's on the GPU, cached or not)."""
    fp8 = isinstance(pool, Fp8Rows)
    out = (pool.rows.view(torch.uint8) if fp8 else pool).clone()
    P = pool.shape[2]
    b, h, i = hits.nonzero(as_tuple=True)
    r = rows[b, h, i]
    out[tables[b, r // P], h, r % P] = 0x7F if fp8 else float("nan")
    return Fp8Rows(out.view(torch.float8_e4m3fn), pool.scale) if fp8 else out
