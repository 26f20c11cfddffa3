"""numba CPU kernels for vAttention decode, parallel over (sequence, KV head); float32 only.

Its own: key_scores, row_scores and partial_attention, the ops that loop over rows: each K/V row
is read once for all query heads of its GQA group, with an online softmax. The others are the
reference's (assigned below), which are vectorised torch over whole tensors already. Shapes:
vengine.kernels.base.KernelBackend.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch
from torch import Tensor

from vengine.kernels import reference
from vengine.kernels.base import Cached, KeyCodes, Partial, Resident
from vengine.kernels.common import ranked, soft_cap

store_rows = reference.store_rows
pick_top = reference.pick_top
exact_rows = reference.exact_rows
proposal_params = reference.proposal_params
pilot_rows = reference.pilot_rows
second_rows = reference.second_rows
pilot_budget = reference.pilot_budget
finish = reference.finish


@nb.njit(parallel=True, cache=True)
def _key_scores(q, codes, scales, tables, lo, hi, out):
    """q [B, Hkv, G, D] (scaled); scales [B, pages per sequence, Hkv, 2, D] (the batch's pages,
    in float32); per page, the scores are q . min + sum_c (q_c step_c) code_c."""
    B, Hkv, G, D = q.shape
    P, nbytes = codes.shape[2], codes.shape[3]
    bits = nbytes * 8 // D
    for bh in nb.prange(B * Hkv):
        b, h = bh // Hkv, bh % Hkv
        w = np.empty((G, D), np.float32)
        base = np.empty(G, np.float32)
        level = np.empty(D, np.float32)
        for j in range(tables.shape[1]):
            page = tables[b, j]
            for g in range(G):
                acc = np.float32(0.0)
                for c in range(D):
                    acc += q[b, h, g, c] * scales[b, j, h, 0, c]
                    w[g, c] = q[b, h, g, c] * scales[b, j, h, 1, c]
                base[g] = acc
            for off in range(P):
                s = j * P + off
                if s < lo or s >= hi[b]:
                    for g in range(G):
                        out[b, h * G + g, s] = -np.inf
                    continue
                for c in range(D):
                    x = 0
                    for t in range(bits):
                        x |= ((codes[page, h, off, t * (D // 8) + c // 8] >> (c % 8)) & 1) << t
                    level[c] = x
                for g in range(G):
                    acc = base[g]
                    for c in range(D):
                        acc += w[g, c] * level[c]
                    out[b, h * G + g, s] = acc


@nb.njit(cache=True)
def _capped(s, cap):
    """common.soft_cap of one score."""
    return cap * math.tanh(s / cap) if cap > 0 else s


@nb.njit(parallel=True, cache=True)
def _row_scores(q, k_pool, tables, rows, counts, scale, cap, out):
    B, Hq, D = q.shape
    Hkv, R = rows.shape[1], rows.shape[2]
    G, P = Hq // Hkv, k_pool.shape[2]
    for bh in nb.prange(B * Hkv):
        b, h = bh // Hkv, bh % Hkv
        n = counts[b, h]
        for i in range(R):
            if i >= n:
                for g in range(G):
                    out[b, h * G + g, i] = -np.inf
                continue
            r = rows[b, h, i]
            page, off = tables[b, r // P], r % P
            for g in range(G):
                acc = np.float32(0.0)
                for d in range(D):
                    acc += q[b, h * G + g, d] * k_pool[page, h, off, d]
                out[b, h * G + g, i] = _capped(acc * scale, cap)


@nb.njit(parallel=True, cache=True)
def _partial_attention(q, k_pool, v_pool, tables, rows, counts, logw, has_w, scale, cap, m_out,
                       l_out, acc_out):
    B, Hq, D = q.shape
    Hkv = rows.shape[1]
    G, P = Hq // Hkv, k_pool.shape[2]
    for bh in nb.prange(B * Hkv):
        b, h = bh // Hkv, bh % Hkv
        m = np.full(G, -np.inf, dtype=np.float32)
        l = np.zeros(G, dtype=np.float32)
        acc = np.zeros((G, D), dtype=np.float32)
        for i in range(counts[b, h]):
            r = rows[b, h, i]
            page, off = tables[b, r // P], r % P
            for g in range(G):
                s = np.float32(0.0)
                for d in range(D):
                    s += q[b, h * G + g, d] * k_pool[page, h, off, d]
                s = _capped(s * scale, cap)
                if has_w:
                    s += logw[b, h, i]
                if s > m[g]:
                    corr = math.exp(m[g] - s) if m[g] > -np.inf else 0.0
                    l[g] *= corr
                    for d in range(D):
                        acc[g, d] *= corr
                    m[g] = s
                p = math.exp(s - m[g])
                l[g] += p
                for d in range(D):
                    acc[g, d] += p * v_pool[page, h, off, d]
        for g in range(G):
            m_out[b, h * G + g] = m[g]
            l_out[b, h * G + g] = l[g]
            for d in range(D):
                acc_out[b, h * G + g, d] = acc[g, d]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def group_scores(q: Tensor, codes: KeyCodes, block_tables: Tensor, hi: Tensor, sink: int,
                 rank_hi: Tensor, scale: float, softcap: float = 0.0) -> Tensor:
    """reference.group_scores over this backend's key_scores."""
    return ranked(key_scores(q, codes, block_tables, 0, hi, scale, softcap), codes[0].shape[1],
                  sink, rank_hi)


def key_scores(q: Tensor, codes: KeyCodes, block_tables: Tensor, lo: int, hi: Tensor,
               scale: float, softcap: float = 0.0) -> Tensor:
    B, Hq, D = q.shape
    Hkv = codes[0].shape[1]
    out = torch.empty(B, Hq, block_tables.shape[1] * codes[0].shape[2], dtype=torch.float32)
    qs = (q.float() * scale).view(B, Hkv, Hq // Hkv, D)
    scales = codes[1][block_tables].float()  # only the batch's pages leave float16
    _key_scores(_np(qs), _np(codes[0]), _np(scales), _np(block_tables), lo, _np(hi), out.numpy())
    if softcap:  # the finite scores only: masked ones stay -inf
        return torch.where(out > float("-inf"), soft_cap(out, softcap), out)
    return out


def row_scores(q: Tensor, k_pool: Tensor, block_tables: Tensor, rows: Tensor, counts: Tensor,
               scale: float, resident: Resident | None = None, softcap: float = 0.0) -> Tensor:
    B, Hq, _ = q.shape
    out = torch.empty(B, Hq, rows.shape[2], dtype=torch.float32)
    _row_scores(_np(q.float()), _np(k_pool), _np(block_tables), _np(rows), _np(counts),
                np.float32(scale), np.float32(softcap), out.numpy())
    return out


def partial_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                      rows: Tensor, counts: Tensor, logw: Tensor | None, scale: float,
                      resident: Resident | None = None, scores: Tensor | None = None,
                      softcap: float = 0.0, cache: Cached | None = None) -> Partial:
    if scores is not None or cache is not None:  # the pilot (its scores known: V only), or a
        # row cache (a GPU pool's): the reference's
        return reference.partial_attention(q, k_pool, v_pool, block_tables, rows, counts, logw,
                                           scale, scores=scores, softcap=softcap, cache=cache)
    B, Hq, D = q.shape
    m, l, acc = torch.empty(B, Hq), torch.empty(B, Hq), torch.empty(B, Hq, D)
    w = _np(logw.float()) if logw is not None else np.zeros((1, 1, 1), np.float32)
    _partial_attention(_np(q.float()), _np(k_pool), _np(v_pool), _np(block_tables), _np(rows),
                       _np(counts), w, logw is not None, np.float32(scale), np.float32(softcap),
                       m.numpy(), l.numpy(), acc.numpy())
    return m, l, acc
