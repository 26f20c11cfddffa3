"""Plain PyTorch reference of every vAttention kernel; the numba and Triton kernels must match it.

Shapes: q [B, Hq, D]; one layer of the paged pool k_pool, v_pool [pages, Hkv, P, D];
block_tables [B, max_pages]; rows [B, Hkv, R] token positions (only the first counts[b, h] are
valid); logw [B, Hkv, R] log importance weights; signatures sig [B, Hkv, S, nbytes] uint8.
The query heads of a GQA group (Hq // Hkv of them) read the same rows.
"""

from __future__ import annotations

import functools

import torch

# _BYTE_SIGNS[v, j] = +1 if bit j of byte v is set, else -1.
_BYTE_SIGNS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float() * 2 - 1


@functools.cache
def byte_signs(device: torch.device) -> torch.Tensor:
    """_BYTE_SIGNS on a device, copied there once (a per-call copy would be a host sync)."""
    return _BYTE_SIGNS.to(device)


def pack_signatures(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """x: [T, Hkv, D], planes: [Hkv, D, nbits] -> [T, Hkv, nbits / 8] uint8 sign bits of x . r_j."""
    bits = torch.einsum("thd,hdn->thn", x.float(), planes) > 0
    T, H, n = bits.shape
    weights = 1 << torch.arange(8, device=x.device)
    return (bits.view(T, H, n // 8, 8).long() * weights).sum(-1).to(torch.uint8)


def hash_scores(q: torch.Tensor, planes: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """Predicted scores [B, Hq, S]: sum_j (q . r_j) * sign(k . r_j), bits weighted by |q . r_j|.

    Each signature byte indexes a 256-entry table of partial sums built from the query, so scoring
    reads nbits / 8 bytes per row instead of the key's D values.
    """
    B, Hq, D = q.shape
    _, Hkv, S, nbytes = sig.shape
    G = Hq // Hkv
    w = torch.einsum("bhgd,hdn->bhgn", q.float().view(B, Hkv, G, D), planes)
    table = w.view(B, Hkv, G, nbytes, 8) @ byte_signs(q.device).T  # [B, Hkv, G, nbytes, 256]
    idx = sig.long().transpose(2, 3)[:, :, None].expand(B, Hkv, G, nbytes, S)
    return table.gather(-1, idx).sum(3).view(B, Hq, S)


def gather_rows(pool: torch.Tensor, block_tables: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """pool [pages, Hkv, P, D], rows [B, Hkv, R] -> [B, Hkv, R, D] (rows past the counts: garbage)."""
    P = pool.shape[2]
    B, Hkv, R = rows.shape
    pages = block_tables.gather(1, (rows // P).view(B, -1)).view(B, Hkv, R)
    heads = torch.arange(Hkv, device=rows.device)[None, :, None]
    return pool[pages, heads, rows % P]


def row_scores(q, k_pool, block_tables, rows, counts, scale: float) -> torch.Tensor:
    """Exact scores q . k / sqrt(D) of the listed rows: [B, Hq, R], -inf past counts."""
    B, Hq, D = q.shape
    Hkv, R = rows.shape[1], rows.shape[2]
    k = gather_rows(k_pool, block_tables, rows).float()
    s = torch.einsum("bhgd,bhrd->bhgr", q.float().view(B, Hkv, Hq // Hkv, D), k) * scale
    live = torch.arange(R, device=q.device) < counts[..., None]  # [B, Hkv, R]
    return s.masked_fill(~live[:, :, None], float("-inf")).view(B, Hq, R)


def partial_attention(q, k_pool, v_pool, block_tables, rows, counts, logw, scale: float):
    """Softmax attention over the listed rows with score bias logw, left unnormalised.

    Returns m [B, Hq] (row max of biased scores), l [B, Hq] (sum of exp(s - m)) and
    acc [B, Hq, D] (sum of exp(s - m) v), all float32; an empty list gives m=-inf, l=0, acc=0.
    """
    B, Hq, D = q.shape
    Hkv = rows.shape[1]
    s = row_scores(q, k_pool, block_tables, rows, counts, scale).view(B, Hkv, Hq // Hkv, -1)
    if logw is not None:
        s = s + logw[:, :, None].float()
    m = s.amax(-1)
    p = torch.exp(s - m.clamp_min(torch.finfo(torch.float32).min)[..., None])
    v = gather_rows(v_pool, block_tables, rows).float()
    acc = torch.einsum("bhgr,bhrd->bhgd", p, v)
    return m.view(B, Hq), p.sum(-1).view(B, Hq), acc.view(B, Hq, D)


def merge_partials(parts) -> torch.Tensor:
    """Combine (m, l, acc) partials over disjoint row sets into the attention output [B, Hq, D]."""
    m = torch.stack([p[0] for p in parts]).amax(0).clamp_min(torch.finfo(torch.float32).min)
    l = sum(p[1] * torch.exp(p[0] - m) for p in parts)
    acc = sum(p[2] * torch.exp(p[0] - m)[..., None] for p in parts)
    return acc / l[..., None]
