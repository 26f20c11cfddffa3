"""The estimator: the second sample's size from the pilot (the CLT budget with its chi2 bound),
and the step's output and D_hat from the three partials."""

from __future__ import annotations

from statistics import NormalDist

import torch
import triton
import triton.language as tl

from vengine.kernels.common import PROPOSAL_FLOOR, sample_z
from vengine.kernels.triton.common import _p2


@triton.jit
def _budget_kernel(s_b, count_b, pa_b, pr_b, m_f, l_f, cap, n_r, dev_b, target, m_out, d_f_out,
                   c_out, logw_out, over_out, missed_out, W, HKV, Z_ALL, ZA_ALL, EPS_ALL, FLOOR,
                   G: tl.constexpr, GP: tl.constexpr, BW: tl.constexpr, HAS_DEV: tl.constexpr,
                   HAS_TARGET: tl.constexpr):
    """One (sequence, KV head): reference.pilot_budget. s_b, dev_b (read if HAS_DEV) [NBH, G, W];
    pa_b, pr_b, logw_out [NBH, W]; the per-head tensors [NBH, G]; count_b, cap, n_r, c_out
    [NBH]; target [B, 3] (read if HAS_TARGET): the sequence's (EPS, Z, ZA), NaN: the layer's."""
    bh = tl.program_id(0).to(tl.int64)
    EPS, Z, ZA = EPS_ALL, Z_ALL, ZA_ALL
    if HAS_TARGET:
        own = target + (bh // HKV) * 3
        t = tl.load(own)
        EPS = tl.where(t == t, t, EPS_ALL)  # NaN != NaN
        t = tl.load(own + 1)
        Z = tl.where(t == t, t, Z_ALL)
        t = tl.load(own + 2)
        ZA = tl.where(t == t, t, ZA_ALL)
    g = tl.arange(0, GP)
    gm = g < G
    nb = tl.load(count_b + bh).to(tl.float32)
    lim = tl.load(cap + bh)
    mf = tl.load(m_f + bh * G + g, mask=gm, other=0.0)  # padding heads: finite, unused
    lf = tl.load(l_f + bh * G + g, mask=gm, other=0.0)
    head_w = (bh * G + g[:, None]) * W  # a head's row in s_b and dev_b
    row = s_b + head_w
    m = mf
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        x = tl.load(row + w[None, :], mask=gm[:, None] & (w < W)[None, :], other=float("-inf"))
        m = tl.maximum(m, tl.max(x, 1))
    d = lf * tl.exp(mf - m)
    d_f = d
    a_sum = tl.zeros([GP], tl.float32)
    x_max = tl.zeros([GP], tl.float32)
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        live = w < nb
        x = tl.exp(tl.load(row + w[None, :], mask=gm[:, None] & (w < W)[None, :],
                           other=float("-inf")) - m[:, None])
        pa = tl.load(pa_b + bh * W + w, mask=live, other=1.0)
        pr = tl.load(pr_b + bh * W + w, mask=live, other=1.0)
        e = tl.where(live[None, :], x / tl.maximum(pa, 1e-30)[None, :], 0.0)
        a = e * x / tl.maximum(pr, 1e-30)[None, :]
        if HAS_DEV:
            a *= tl.load(dev_b + head_w + w[None, :], mask=gm[:, None] & live[None, :],
                         other=0.0)
        d += tl.sum(e, 1)
        a_sum += tl.sum(a, 1)
        x_max = tl.maximum(x_max, tl.max(tl.where(live[None, :], x, 0.0), 1))
    infl = _chi2_factor(nb, ZA)
    c_head = infl * a_sum / tl.maximum((EPS * d / Z) * (EPS * d / Z), 1e-30)
    c_head = tl.where(nb >= 2, c_head, float("inf"))
    c = tl.minimum(tl.max(tl.where(gm, c_head, float("-inf")), 0), lim)
    tl.store(m_out + bh * G + g, m, mask=gm)
    tl.store(d_f_out + bh * G + g, d_f, mask=gm)
    bar = tl.where(c < tl.load(n_r + bh) / FLOOR, c * (1 + 1e-4), float("inf"))  # all in: none
    tl.store(over_out + bh * G + g, tl.where(c_head > bar, 1.0, 0.0), mask=gm)
    tl.store(missed_out + bh * G + g, tl.where(x_max >= EPS * d, 1.0, 0.0), mask=gm)
    tl.store(c_out + bh, c)
    infl1 = _chi2_factor(nb - 1, ZA)  # the budget without one pilot row: its own terms out
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        live = w < nb
        x = tl.exp(tl.load(row + w[None, :], mask=gm[:, None] & (w < W)[None, :],
                           other=float("-inf")) - m[:, None])
        pa = tl.load(pa_b + bh * W + w, mask=live, other=1.0)
        pr = tl.load(pr_b + bh * W + w, mask=live, other=1.0)
        e = x / tl.maximum(pa, 1e-30)[None, :]
        a = e * x / tl.maximum(pr, 1e-30)[None, :]
        if HAS_DEV:
            a *= tl.load(dev_b + head_w + w[None, :], mask=gm[:, None] & live[None, :],
                         other=0.0)
        d_loo = tl.maximum(d[:, None] - e, 0.0)
        c_loo = infl1 * (a_sum[:, None] - a) / tl.maximum(
            (EPS * d_loo / Z) * (EPS * d_loo / Z), 1e-30)
        c_loo = tl.where(nb - 1 >= 2, c_loo, float("inf"))
        c_loo = tl.minimum(tl.max(tl.where(gm[:, None], c_loo, float("-inf")), 0), lim)
        pi = 1 - (1 - pa) * (1 - tl.minimum(c_loo * pr, 1.0))
        tl.store(logw_out + bh * W + w, -tl.log(tl.maximum(pi, 1e-30)), mask=w < W)


@triton.jit
def _chi2_factor(n, ZA):
    """kernels.common.sigma_upper_factor(n, alpha) squared (ZA = its normal quantile)."""
    k = tl.maximum(n - 1, 1.0)
    c = 1 - 2 / (9 * k) + ZA * tl.sqrt(2 / (9 * k))
    return k / tl.maximum(k * c * c * c, 1e-3)


@triton.jit
def _finish_kernel(m_f, l_f, acc_f, m_b, l_b, acc_b, m_s, l_s, acc_s, m, d_f, out, d_hat_out,
                   N, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """G of the N = B * Hq query heads: merge the three partials and D_hat (reference.finish).
    Per-head tensors [N], acc and out [N, D]."""
    g, d = tl.arange(0, G), tl.arange(0, DP)
    h = tl.program_id(0).to(tl.int64) * G + g
    gm = h < N
    gd = gm[:, None] & (d < D)[None, :]
    mf = tl.load(m_f + h, mask=gm, other=0.0)  # padding heads: finite, unused
    mb = tl.load(m_b + h, mask=gm, other=float("-inf"))
    ms = tl.load(m_s + h, mask=gm, other=float("-inf"))
    lf = tl.load(l_f + h, mask=gm, other=1.0)
    lb = tl.load(l_b + h, mask=gm, other=0.0)
    ls = tl.load(l_s + h, mask=gm, other=0.0)
    top = tl.maximum(tl.maximum(tl.maximum(mf, mb), ms), -3.4028234663852886e38)
    cf, cb, cs = tl.exp(mf - top), tl.exp(mb - top), tl.exp(ms - top)
    o = tl.load(acc_f + h[:, None] * D + d[None, :], mask=gd, other=0.0) * cf[:, None]
    o += tl.load(acc_b + h[:, None] * D + d[None, :], mask=gd, other=0.0) * cb[:, None]
    o += tl.load(acc_s + h[:, None] * D + d[None, :], mask=gd, other=0.0) * cs[:, None]
    tl.store(out + h[:, None] * D + d[None, :], o / (lf * cf + lb * cb + ls * cs)[:, None],
             mask=gd)
    mh = tl.load(m + h, mask=gm, other=0.0)
    d_hat = tl.load(d_f + h, mask=gm, other=1.0) + lb * tl.exp(mb - mh) + ls * tl.exp(ms - mh)
    tl.store(d_hat_out + h, d_hat, mask=gm)


def pilot_budget(s_b, count_b, pa_b, pr_b, m_f, l_f, cap, n_r, epsilon: float, delta: float,
                 dev_b=None, target=None):
    """The second sample's size from the pilot, one program per group (reference.pilot_budget):
    m, d_f, c, logw_b, over_eps and missed."""
    B, Hq, W = s_b.shape
    Hkv = count_b.shape[1]
    G = Hq // Hkv
    dev = s_b.device
    m, d_f, over, missed = (torch.empty(B, Hq, dtype=torch.float32, device=dev) for _ in range(4))
    c = torch.empty(B, Hkv, dtype=torch.float32, device=dev)
    logw = torch.empty(B, Hkv, W, dtype=torch.float32, device=dev)
    _budget_kernel[(B * Hkv,)](
        s_b.contiguous(), count_b.contiguous(), pa_b.contiguous(), pr_b.contiguous(),
        m_f.contiguous(), l_f.contiguous(), cap.float().contiguous(), n_r.float().contiguous(),
        s_b if dev_b is None else dev_b.contiguous(),
        s_b if target is None else target.float().contiguous(), m, d_f, c, logw, over, missed, W,
        Hkv, sample_z(delta), NormalDist().inv_cdf(delta / 2), epsilon, PROPOSAL_FLOOR, G,
        _p2(G, 1), 256, dev_b is not None, target is not None)
    return m, d_f, c, logw, over, missed


def finish(part_f, part_b, part_s, m, d_f):
    """Output and D_hat from the three partials (reference.finish)."""
    B, Hq, D = part_f[2].shape
    G = 4  # query heads per program
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=m.device)
    d_hat = torch.empty_like(m)
    c = [t.contiguous() for part in (part_f, part_b, part_s) for t in part]
    _finish_kernel[(triton.cdiv(B * Hq, G),)](*c, m.contiguous(), d_f.contiguous(), out, d_hat,
                                              B * Hq, G, D, _p2(D, 1))
    return out, d_hat
