"""Row selection without a host sync: the exact rows, the pilot and the second sample as sorted
lists (two passes over splits of the positions: count, then write from each split's offset), and
the sampling proposal's parameters."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vengine.kernels.common import PROPOSAL_FLOOR
from vengine.kernels.triton.common import _p2

SPLIT = 4096  # context positions per row-selection program
BLOCK_SEL = 1024  # positions per row-selection inner step


@triton.jit
def _rows_kernel(picked, scores, u, lse_, n_r_, size_, c_, lens, counts, total, rows,
                 aux0, aux1, width, S, NBH, sp, SINK, WINDOW, FLOOR, HKV: tl.constexpr,
                 MODE: tl.constexpr, WRITE: tl.constexpr, SPLIT_: tl.constexpr,
                 BLOCK: tl.constexpr, NSP: tl.constexpr):
    """One split of the positions of one (sequence, KV head). MODE 0: the exact rows (sink,
    window or picked). MODE 1: the pilot, residual rows with u0 < pa = min(1, size * pr), pa and
    pr listed beside (aux0, aux1). MODE 2: the second sample, residual rows with u0 >= pa and
    u1 < pc = min(1, c * pr), the log weight -log(1 - (1 - pa)(1 - pc)) beside (aux0). The
    proposal pr = (1 - FLOOR) exp(score - lse) + FLOOR / n_r (reference.proposal); the
    per-head lse, n_r, size and c are [NBH] f32. Pass 1 (WRITE False) counts rows per
    split; pass 2 writes them, ascending, from the split's offset (the sum of the earlier splits'
    counts), and split 0 writes the list's length, at most width. scores, u [2, NBH, S] and the
    lists [NBH, width] are contiguous."""
    bh = tl.program_id(0).to(tl.int64)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    b = bh // HKV
    n = tl.load(lens + b)
    start = split * SPLIT_
    end = tl.minimum(start + SPLIT_, n)
    if MODE > 0:
        lse = tl.load(lse_ + bh)
        floor = FLOOR / tl.maximum(tl.load(n_r_ + bh), 1.0)
        size = tl.load(size_ + bh)
        if MODE == 2:
            c = tl.load(c_ + bh)
    count = tl.zeros([], tl.int32)
    if WRITE:
        j = tl.arange(0, NSP)
        per_split = tl.load(counts + bh * n_splits + j, mask=j < n_splits, other=0)
        count += tl.sum(tl.where(j < split, per_split, 0), 0)
        if split == 0:
            tl.store(total + bh, tl.minimum(tl.sum(per_split, 0), width).to(tl.int64))
    for s0 in range(start, end, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        valid = s < end
        keep = valid & ((s < SINK) | (s >= n - WINDOW))
        keep |= valid & (tl.load(picked + bh * sp + s, mask=valid, other=0) != 0)
        if MODE > 0:
            resid = valid & ~keep
            x = tl.load(scores + bh * S + s, mask=resid, other=float("-inf"))
            pr = (1 - FLOOR) * tl.exp(x - lse) + floor
            pa = tl.minimum(size * pr, 1.0)
            u0 = tl.load(u + bh * S + s, mask=valid, other=1.0)
            if MODE == 1:
                keep = resid & (u0 < pa)
            else:
                pc = tl.minimum(c * pr, 1.0)
                u1 = tl.load(u + (NBH + bh) * S + s, mask=valid, other=1.0)
                keep = resid & (u0 >= pa) & (u1 < pc)
        k = keep.to(tl.int32)
        if WRITE:
            slot = count + tl.cumsum(k, 0) - 1
            out = keep & (slot < width)
            tl.store(rows + bh * width + slot, s.to(tl.int64), mask=out)
            if MODE == 1:
                tl.store(aux0 + bh * width + slot, pa, mask=out)
                tl.store(aux1 + bh * width + slot, pr, mask=out)
            if MODE == 2:
                w = -tl.log(tl.maximum(1 - (1 - pa) * (1 - pc), 1e-30))
                tl.store(aux0 + bh * width + slot, w, mask=out)
        count += tl.sum(k, 0)
    if not WRITE:
        tl.store(counts + bh * n_splits + split, count)


@triton.jit
def _proposal_kernel(scores, picked, stats, S, sp, SPLIT_: tl.constexpr, BLOCK: tl.constexpr):
    """One split of one (sequence, KV head)'s residual (finite score, not picked): the max and
    sum of exp(score - max) (stats [NBH, splits, 2])."""
    bh = tl.program_id(0).to(tl.int64)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    total = tl.zeros([], tl.float32)
    mx = tl.full([], float("-inf"), tl.float32)
    for s0 in range(split * SPLIT_, tl.minimum(split * SPLIT_ + SPLIT_, S), BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        valid = s < S
        x = tl.load(scores + bh * S + s, mask=valid, other=float("-inf"))
        resid = (x > float("-inf")) & (tl.load(picked + bh * sp + s, mask=valid, other=1) == 0)
        y = tl.where(resid, x, float("-inf"))
        new = tl.maximum(mx, tl.max(y, 0))
        safe = tl.where(new == float("-inf"), 0.0, new)
        total = total * tl.exp(mx - safe) + tl.sum(tl.exp(y - safe), 0)
        mx = new
    out = stats + (bh * n_splits + split) * 2
    tl.store(out, mx)
    tl.store(out + 1, total)


@triton.jit
def _lse_kernel(stats, lse, n_splits, NSP: tl.constexpr):
    """One (sequence, KV head): logsumexp from the splits' (max, sum of exp) of _proposal_kernel;
    -inf for an empty residual."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NSP)
    mx = tl.load(stats + (bh * n_splits + j) * 2, mask=j < n_splits, other=float("-inf"))
    se = tl.load(stats + (bh * n_splits + j) * 2 + 1, mask=j < n_splits, other=0.0)
    top = tl.maximum(tl.max(mx, 0), -3.4028234663852886e38)
    tl.store(lse + bh, top + tl.log(tl.sum(se * tl.exp(mx - top), 0)))


def _select(mode: int, picked, context_lens, sink: int, window: int, width: int, S: int,
            u=None, prop=None, size=None, c=None):
    """Row lists [B, Hkv, width] and counts [B, Hkv] (see _rows_kernel), and the lists beside."""
    assert picked.dtype == torch.int8 and picked.stride(-1) == 1 and picked.shape[-1] >= S
    B, Hkv, dev = len(context_lens), picked.shape[1], context_lens.device
    n_splits = max(1, triton.cdiv(S, SPLIT))
    counts = torch.empty(B, Hkv, n_splits, dtype=torch.int32, device=dev)
    total = torch.empty(B, Hkv, dtype=torch.long, device=dev)
    rows = torch.empty(B, Hkv, width, dtype=torch.long, device=dev)
    aux = [torch.empty(B, Hkv, width, dtype=torch.float32, device=dev)
           for _ in range((0, 2, 1)[mode])]  # pilot: pa, pr; second sample: log weights
    dummy = counts
    head = [dummy] * 5  # scores, lse, n_r, size, c
    if mode:
        assert u.is_contiguous() and u.shape == (2, B, Hkv, S)
        head = [x.float().contiguous() for x in (*prop, size, c if c is not None else size)]
    for write in (False, True):
        _rows_kernel[(B * Hkv, n_splits)](
            picked, head[0], u if mode else dummy, *head[1:], context_lens, counts, total, rows,
            *(aux + [dummy, dummy])[:2], width, S, B * Hkv, picked.stride(1), sink, window,
            PROPOSAL_FLOOR, Hkv, mode, write, SPLIT, BLOCK_SEL, _p2(n_splits, 1))
    return rows, total, *aux


def exact_rows(picked, context_lens, S: int, sink: int, window: int, width: int):
    """Row lists [B, Hkv, width] of sink, window and picked rows, counts [B, Hkv] (reference)."""
    return _select(0, picked, context_lens, sink, window, width, S)


def pilot_rows(picked, u, prop, size, context_lens, sink: int, window: int, width: int):
    """The pilot's lists, counts, pa and pr (reference.pilot_rows)."""
    return _select(1, picked, context_lens, sink, window, width, u.shape[-1], u, prop, size)


def second_rows(picked, u, prop, size, c, context_lens, sink: int, window: int, width: int):
    """The second sample's lists, counts and log weights (reference.second_rows)."""
    return _select(2, picked, context_lens, sink, window, width, u.shape[-1], u, prop, size, c)


def proposal_params(scores: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """lse [B, Hkv] of the residual's predicted log weights (reference.proposal_params): each
    split of the positions its max and sum of exp, then one program per head combines them."""
    B, Hkv, S = scores.shape
    assert scores.is_contiguous()
    n_splits = max(1, triton.cdiv(S, SPLIT))
    stats = torch.empty(B * Hkv, n_splits, 2, dtype=torch.float32, device=scores.device)
    lse = torch.empty(B, Hkv, dtype=torch.float32, device=scores.device)
    _proposal_kernel[(B * Hkv, n_splits)](scores, picked, stats, S, picked.stride(1), SPLIT,
                                          BLOCK_SEL)
    _lse_kernel[(B * Hkv,)](stats, lse, n_splits, _p2(n_splits, 1))
    return lse
