"""Plain PyTorch reference of every vAttention kernel (base.KernelBackend, which gives the
shapes): the oracle the numba and Triton kernels are tested against, and the 'torch' backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vengine.kernels.base import Cached, KeyCodes, Partial, Proposal, Resident
from vengine.kernels.common import (PROPOSAL_FLOOR, Fp8Rows, compact, decode_keys, encode_pages,
                                    gather_rows, mask_range, merge_partials, pool_rows,
                                    pool_write, per_sequence_target, ranked,
                                    sigma_upper_factor, soft_cap)


def store_rows(k: Tensor, v: Tensor, slots: Tensor, k_pool: Tensor, v_pool: Tensor,
               codes: KeyCodes | None = None, resident: Resident | None = None) -> None:
    """Write a step's K/V rows [T, Hkv, D] at flat slots [T] (page * P + offset) into one layer's
    pools, then encode every page whose last row this step wrote into codes (base.KeyCodes; none
    where codes is None: exact attention keeps none). Prefill and decode both write through it.
    A page is encoded once, when full: the rows of an unfinished page are in the recent window,
    which is attended exactly (VAttentionBackend keeps the window at least a page).

    resident (here and in row_scores, partial_attention): GPU copies of some pages
    (base.Resident), which the Triton kernels keep and read; the pool holds every row, so the
    reference ignores them. k_pool, v_pool may be common.Fp8Rows (here and in row_scores,
    partial_attention): rows quantised per row as they are written."""
    P = k_pool.shape[2]
    pages, offsets = slots // P, slots % P
    pool_write(k_pool, (pages, slice(None), offsets), k)
    pool_write(v_pool, (pages, slice(None), offsets), v)
    if codes is not None:  # encoded from the keys as stored (an Fp8Rows pool: dequantised)
        full = pages[offsets == P - 1]
        bits = codes[0].shape[-1] * 8 // k.shape[-1]
        packed, scales = encode_pages(pool_rows(k_pool, full), bits)
        codes[0][full], codes[1][full] = packed, scales


def key_scores(q: Tensor, codes: KeyCodes, block_tables: Tensor, lo: int, hi: Tensor,
               scale: float, softcap: float = 0.0) -> Tensor:
    """Predicted scores [B, Hq, S] of positions lo <= s < hi[b] (-inf elsewhere): q . k_hat *
    scale, k_hat the keys decoded from their codes (common.decode_keys); softcap (here and in
    row_scores, partial_attention): common.soft_cap, 0 for none."""
    B, Hq, D = q.shape
    k_hat = decode_keys(codes[0][block_tables], codes[1][block_tables])  # [B, n, Hkv, P, D]
    Hkv = k_hat.shape[2]
    k_hat = k_hat.transpose(1, 2).flatten(2, 3)  # [B, Hkv, S, D]
    S = k_hat.shape[2]
    s = torch.einsum("bhgd,bhsd->bhgs", q.float().view(B, Hkv, Hq // Hkv, D), k_hat) * scale
    return mask_range(soft_cap(s, softcap).reshape(B, Hq, S), lo, hi)


def group_scores(q: Tensor, codes: KeyCodes, block_tables: Tensor, hi: Tensor, sink: int,
                 rank_hi: Tensor, scale: float, softcap: float = 0.0) -> Tensor:
    """The predictor's ranking [B, Hkv, S]: each GQA group's log weights (common.ranked) of the
    key_scores of positions s < hi[b], -inf outside sink <= s < rank_hi[b]."""
    return ranked(key_scores(q, codes, block_tables, 0, hi, scale, softcap), codes[0].shape[1],
                  sink, rank_hi)


def pick_top(scores: Tensor, k_max: int, k_rows: Tensor) -> Tensor:
    """picked [B, Hkv, S + 1] int8 from scores [B, Hkv, S]: 1 at each (b, h)'s k_rows[b] highest
    finite scores (k_rows [B] <= k_max, a host int that sizes the buffers); column S is scratch."""
    B, H, S = scores.shape
    picked = torch.zeros(B, H, S + 1, dtype=torch.int8, device=scores.device)
    if k_max > 0:
        top = scores.topk(k_max, dim=-1)  # sorted: the first k_rows[b] are the best
        rank = torch.arange(k_max, device=scores.device)
        keep = (rank < k_rows[:, None, None]) & (top.values > float("-inf"))
        picked.scatter_(-1, torch.where(keep, top.indices, S), 1)
    return picked


def exact_mask(picked: Tensor, context_lens: Tensor, S: int, sink: int, window: int) -> Tensor:
    """[B, Hkv, S]: the rows attended exactly: sink, recent window and the picked rows."""
    pos = torch.arange(S, device=context_lens.device)
    n = context_lens[:, None, None]
    valid = pos < n
    return valid & ((pos < sink) | (pos >= n - window) | (picked[..., :S] != 0))


def exact_rows(picked: Tensor, context_lens: Tensor, S: int, sink: int, window: int,
               width: int) -> tuple[Tensor, Tensor]:
    """Row lists [B, Hkv, width] and counts [B, Hkv] of exact_mask."""
    return compact(exact_mask(picked, context_lens, S, sink, window), width)


def proposal_params(scores: Tensor, picked: Tensor) -> Tensor:
    """scores [B, Hkv, S]: the group's predicted log weights (common.group_log_weights) of the
    candidates (-inf elsewhere), picked: the top-k. lse [B, Hkv]: their logsumexp over the
    residual, so that the proposal pr_i = (1 - f) exp(score_i - lse) + f / n_R sums to 1 on R.

    Why: the variance of a Horvitz-Thompson sum of weights is least with rows drawn in
    proportion to their weights, which the predicted weights approximate; the uniform floor f
    bounds the variance at 1/f of a uniform sample's where the prediction is wrong (defensive
    importance sampling).
    """
    resid = torch.isfinite(scores) & (picked[..., :scores.shape[-1]] == 0)
    return torch.logsumexp(torch.where(resid, scores, float("-inf")), -1)


def residual_mask(picked: Tensor, context_lens: Tensor, S: int, sink: int, window: int
                  ) -> Tensor:
    """[B, Hkv, S]: the residual R, the valid rows not in exact_mask."""
    pos = torch.arange(S, device=context_lens.device)
    return (pos < context_lens[:, None, None]) & ~exact_mask(picked, context_lens, S, sink, window)


def proposal(prop: Proposal, resid: Tensor) -> Tensor:
    """The proposal [B, Hkv, S] of residual rows from prop = (scores, lse, n_r) (see
    proposal_params): (1 - f) exp(score - lse) + f / n_R on R, 0 elsewhere."""
    scores, lse, n_r = prop
    soft = torch.exp(scores - lse[..., None])
    pr = (1 - PROPOSAL_FLOOR) * soft + PROPOSAL_FLOOR / n_r.clamp(min=1)[..., None]
    return torch.where(resid, pr, 0.0)


def pilot_rows(picked: Tensor, u: Tensor, prop: Proposal, size: Tensor, context_lens: Tensor,
               sink: int, window: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pilot: row i of R with probability pa_i = min(1, size * pr_i) (kept when u[0] < pa;
    u [2, B, Hkv, S], size [B, Hkv]). Lists [B, Hkv, width] (the first width rows) and counts, and
    each listed row's pa and pr [B, Hkv, width]."""
    resid = residual_mask(picked, context_lens, u.shape[-1], sink, window)
    pr = proposal(prop, resid)
    pa = torch.clamp(size[..., None] * pr, max=1.0)
    rows, counts = compact(resid & (u[0] < pa), width)
    return rows, counts, pa.gather(-1, rows), pr.gather(-1, rows)


def second_rows(picked: Tensor, u: Tensor, prop: Proposal, size: Tensor, c: Tensor,
                context_lens: Tensor, sink: int, window: int, width: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The second sample: row i of R outside the pilot (u[0] >= pa_i) with probability
    pc_i = min(1, c * pr_i) (kept when u[1] < pc). Lists, counts, and each listed row's log
    weight -log(1 - (1 - pa)(1 - pc)): the inverse of its probability of being in the union."""
    resid = residual_mask(picked, context_lens, u.shape[-1], sink, window)
    pr = proposal(prop, resid)
    pa = torch.clamp(size[..., None] * pr, max=1.0)
    pc = torch.clamp(c[..., None] * pr, max=1.0)
    rows, counts = compact(resid & (u[0] >= pa) & (u[1] < pc), width)
    pi = 1 - (1 - pa.gather(-1, rows)) * (1 - pc.gather(-1, rows))
    return rows, counts, -torch.log(pi.clamp(min=1e-30))


def row_scores(q: Tensor, k_pool: Tensor, block_tables: Tensor, rows: Tensor, counts: Tensor,
               scale: float, resident: Resident | None = None, softcap: float = 0.0) -> Tensor:
    """Exact scores q . k / sqrt(D) of the listed rows: [B, Hq, R], -inf past counts."""
    return _scores(q, gather_rows(k_pool, block_tables, rows).float(), counts, scale, softcap)


def _scores(q: Tensor, k: Tensor, counts: Tensor, scale: float, softcap: float) -> Tensor:
    """row_scores of the gathered rows k [B, Hkv, R, D] f32."""
    B, Hq, D = q.shape
    Hkv, R = k.shape[1], k.shape[2]
    s = soft_cap(torch.einsum("bhgd,bhrd->bhgr", q.float().view(B, Hkv, Hq // Hkv, D), k) * scale,
                 softcap)
    live = torch.arange(R, device=q.device) < counts[..., None]  # [B, Hkv, R]
    return s.masked_fill(~live[:, :, None], float("-inf")).view(B, Hq, R)


def _cached_rows(pool, block_tables: Tensor, rows: Tensor, counts: Tensor, src: Tensor,
                 held: Tensor, new: Tensor) -> Tensor:
    """Rows [B, Hkv, R, D] f32 of the pool, those with src >= 0 taken from held (base.Cached);
    the live ones written to new as the pool stores them (e4m3 for an fp8 pool, whose scales
    stay the pool's)."""
    B, Hkv, R = rows.shape
    P = pool.shape[2]
    index = (block_tables.gather(1, (rows // P).view(B, -1)).view(B, Hkv, R),
             torch.arange(Hkv, device=rows.device)[None, :, None], rows % P)
    fp8 = isinstance(pool, Fp8Rows)
    bits = (lambda t: t.view(torch.uint8)) if fp8 else (lambda t: t)  # e4m3: no gather on CPU
    x = bits((pool.rows if fp8 else pool)[index])  # as stored
    x = torch.where((src >= 0)[..., None],
                    bits(held).gather(2, src.clamp(min=0).long()[..., None].expand_as(x)), x)
    live = (torch.arange(R, device=rows.device) < counts[..., None])[..., None]
    bits(new)[:, :, :R] = torch.where(live, x, bits(new)[:, :, :R])
    x = x.view(pool.rows.dtype).float() * pool.scale[index].float()[..., None] if fp8 else x.float()
    return torch.where(live, x, 0.0)  # dead entries: no row (0 * their weight 0)


def partial_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                      rows: Tensor, counts: Tensor, logw: Tensor | None, scale: float,
                      resident: Resident | None = None, scores: Tensor | None = None,
                      softcap: float = 0.0, cache: Cached | None = None) -> Partial:
    """Softmax attention over the listed rows with score bias logw, left unnormalised; scores:
    the rows' row_scores when known (the kernels then skip reading K; softcap is in them);
    cache: rows held from the step before (base.Cached), read from there and written beside.

    Returns m [B, Hq] (row max of biased scores), l [B, Hq] (sum of exp(s - m)) and
    acc [B, Hq, D] (sum of exp(s - m) v), all float32; an empty list gives m=-inf, l=0, acc=0.
    """
    B, Hq, D = q.shape
    Hkv = rows.shape[1]
    if cache is not None:
        assert scores is None, "a row cache holds K and V: the list's K is read"
        src, k_held, v_held, k_new, v_new = cache
        k = _cached_rows(k_pool, block_tables, rows, counts, src, k_held, k_new)
        v = _cached_rows(v_pool, block_tables, rows, counts, src, v_held, v_new)
        scores = _scores(q, k, counts, scale, softcap)
    else:
        if scores is None:
            scores = row_scores(q, k_pool, block_tables, rows, counts, scale, softcap=softcap)
        v = gather_rows(v_pool, block_tables, rows).float()
    s = scores.view(B, Hkv, Hq // Hkv, -1)
    if logw is not None:
        s = s + logw[:, :, None].float()
    m = s.amax(-1)
    p = torch.exp(s - m.clamp_min(torch.finfo(torch.float32).min)[..., None])
    acc = torch.einsum("bhgr,bhrd->bhgd", p, v)
    return m.view(B, Hq), p.sum(-1).view(B, Hq), acc.view(B, Hq, D)


def pilot_budget(s_b: Tensor, count_b: Tensor, pa_b: Tensor, pr_b: Tensor, m_f: Tensor,
                 l_f: Tensor, cap: Tensor, n_r: Tensor, epsilon: float, delta: float,
                 dev_b: Tensor | None = None, target: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The second sample's size from the pilot. The residual R is sampled twice: the pilot
    (Poisson, probability pa per row), then a Poisson sample with probability min(1, c * pr); D_hat
    is Horvitz-Thompson over their union.

    s_b [B, Hq, W]: the pilot rows' scores (-inf past count_b [B, Hkv]); pa_b, pr_b [B, Hkv, W]:
    their pilot probability and proposal; m_f, l_f [B, Hq]: the exact rows' partials; cap [B, Hkv]
    the largest c allowed; n_r [B, Hkv] the residual's size. Per head, with x = exp(s - m) (m the
    largest score seen), the pilot gives HT estimates of D = D_F + sum_R x and of
    A = sum_R x^2 r / pr. The second sample's HT variance, sum_R x^2 r (1 / min(1, c pr) - 1), is
    below A / c (the variance of drawing row i Poisson(c pr_i) times), so c = A / (epsilon * D /
    z)^2 meets z * sd <= epsilon * D; the group takes its heads' largest c. delta is split: A is
    inflated by the chi2 factor that bounds a sample variance with probability 1 - delta/2 (pilot
    noise), and z = z_{1-delta/4}.

    r is 1 for the denominator guarantee (|D_hat - D| <= epsilon D). For the output guarantee
    (|o_hat - o| <= epsilon |o|) dev_b [B, Hq, W] gives r = |v_i - o|^2 / |o|^2 per pilot row
    (o from the exact rows and the pilot): the linearised error of the ratio N_hat / D_hat is
    sum_R (I_i / pi_i - 1) x_i (v_i - o) / D, whose squared norm's mean is that variance over
    (|o| D)^2; z bounds its norm too (a Gaussian vector's squared norm over its mean has the
    tail of chi2 with one degree of freedom at most, beyond ~1.54 times the mean).

    target [B, 3] (common.accuracy_targets): a sequence's own epsilon and delta, where it has
    them, in place of the layer's (epsilon, delta).

    Unbiased: c depends on the pilot, so a pilot row's inclusion probability
    1 - (1 - pa)(1 - min(1, c pr)) is taken with c_{-i}, the budget computed without that row;
    given the other rows, row i is then in the union with exactly the probability it is weighted
    by. Returns m, d_f [B, Hq], c [B, Hkv], logw_b [B, Hkv, W] (the pilot rows' log weights,
    -log of their inclusion probabilities), over_eps [B, Hq]: 1 where the cap kept a head from
    its budget, unless c >= n_r / PROPOSAL_FLOOR (then every row is in, as pr >= f / n_R, and
    there is no error to certify); and missed [B, Hq]: 1 where a pilot row, outside the
    predicted top-k by construction, holds at least epsilon of the head's estimated attention
    mass: the predictor missed a heavy row (the estimate stays unbiased, its budget grows).
    """
    B, Hq, W = s_b.shape
    Hkv = count_b.shape[1]
    G = Hq // Hkv
    m = torch.maximum(m_f, s_b.amax(-1))  # any per-head constant works: use the largest seen
    live = (torch.arange(W, device=s_b.device) < count_b[..., None])[:, :, None]  # [B,Hkv,1,W]
    x = torch.exp(s_b - m[..., None]).view(B, Hkv, G, W)  # 0 past the counts
    e = torch.where(live, x / pa_b.clamp(min=1e-30)[:, :, None], 0.0)
    a = e * x / pr_b.clamp(min=1e-30)[:, :, None]
    if dev_b is not None:
        a = a * torch.where(live, dev_b.view(B, Hkv, G, W), 0.0)
    d_f = (l_f * torch.exp(m_f - m)).view(B, Hkv, G)
    eps, z, za = per_sequence_target(target, epsilon, delta, B, s_b.device).unbind(1)  # [B] each
    nb = count_b.float()

    def need(d, a_sum, n_pilot):
        """c of each head [B, Hkv, G, ...]; a pilot of fewer than 2 rows asks for everything."""
        more = (None,) * (d.dim() - 3)  # the trailing dims past G
        infl = (sigma_upper_factor(n_pilot, za.view(B, 1)) ** 2)[(..., None) + more]
        bound = (eps / z).view(B, 1, 1, *(1,) * len(more)) * d
        c = infl * a_sum / (bound ** 2).clamp(min=1e-30)
        return torch.where(n_pilot[(..., None) + more] >= 2, c, float("inf"))

    D, A = d_f + e.sum(-1), a.sum(-1)  # [B, Hkv, G]
    c_head = need(D, A, nb)
    c = torch.minimum(c_head.amax(2), cap)
    c_loo = need((D[..., None] - e).clamp(min=0), A[..., None] - a, nb - 1).amax(2)
    pi_b = 1 - (1 - pa_b) * (1 - torch.clamp(torch.minimum(c_loo, cap[..., None]) * pr_b, max=1))
    over_eps = (c_head > c[..., None] * (1 + 1e-4)) & (c < n_r / PROPOSAL_FLOOR)[..., None]
    missed = torch.where(live, x, 0.0).amax(-1) >= eps.view(B, 1, 1) * D
    missed = missed.float().view(B, Hq)
    return (m, d_f.view(B, Hq), c, -torch.log(pi_b.clamp(min=1e-30)),
            over_eps.float().view(B, Hq), missed)


def finish(part_f: Partial, part_b: Partial, part_s: Partial, m: Tensor, d_f: Tensor
           ) -> tuple[Tensor, Tensor]:
    """The step's output [B, Hq, D] f32 from the partials (m, l, acc) of the exact rows, the
    pilot and the second sample, and D_hat [B, Hq] at exp(-m)."""
    d_hat = d_f + sum(p[1] * torch.exp(p[0] - m) for p in (part_b, part_s))
    return merge_partials([part_f, part_b, part_s]), d_hat
