"""What the kernel backends share with the rest of vengine: the signature packing, the paged
layout's gathers and masks, no-sync compaction, and the sampler's constants and quantiles.

Production code (offload/, attention/, eval/) imports these from here; reference.py is the oracle.
"""

from __future__ import annotations

import functools
from statistics import NormalDist

import torch
import torch.nn.functional as F

# _BYTE_SIGNS[v, j] = +1 if bit j of byte v is set, else -1.
_BYTE_SIGNS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float() * 2 - 1

PROPOSAL_TEMPERATURE = 1.0  # hash scores in units of their spread over the residual
PROPOSAL_FLOOR = 0.1  # share of the proposal spread uniformly (defensive mixture)


@functools.cache
def byte_signs(device: torch.device) -> torch.Tensor:
    """[256, 8] +-1 sign of each bit of each byte value, copied to a device once (a per-call copy
    would be a host sync)."""
    return _BYTE_SIGNS.to(device)


def pack_signatures(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """x: [T, Hkv, D], planes: [Hkv, D, nbits] -> [T, Hkv, nbits / 8] uint8 sign bits of x . r_j."""
    bits = torch.einsum("thd,hdn->thn", x.float(), planes) > 0
    T, H, n = bits.shape
    weights = 1 << torch.arange(8, device=x.device)
    return (bits.view(T, H, n // 8, 8).long() * weights).sum(-1).to(torch.uint8)


def paged_signatures(k_pool: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Signatures of every row of a pool [pages, Hkv, P, D] -> [pages, Hkv, P, nbytes]."""
    pages, H, P, D = k_pool.shape
    sig = pack_signatures(k_pool.transpose(1, 2).reshape(-1, H, D), planes)
    return sig.view(pages, P, H, -1).transpose(1, 2).contiguous()


def paged_rows(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """pool [pages, Hkv, P, ...] -> each sequence's rows in token order [B, Hkv, S, ...]."""
    x = pool[block_tables]  # [B, max_pages, Hkv, P, ...]
    B, n, H, P = x.shape[:4]
    return x.transpose(1, 2).reshape(B, H, n * P, *x.shape[4:])


def mask_range(scores: torch.Tensor, lo: int, hi: torch.Tensor) -> torch.Tensor:
    """scores [B, H, S] with -inf outside positions lo <= s < hi[b]."""
    pos = torch.arange(scores.shape[-1], device=scores.device)
    keep = (pos >= lo) & (pos < hi[:, None])
    return scores.masked_fill(~keep[:, None], float("-inf"))


def row_cumsum(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Inclusive cumsum of [B, H, S] along S in two levels (within blocks, then block carries).

    Why: a scan along the last dim parallelises over its B * H rows only; with 8 rows of 128K
    it took 0.2 ms per call on the H100.
    """
    B, H, S = x.shape
    if S <= block:
        return x.cumsum(-1)
    inner = F.pad(x, (0, -S % block)).view(B, H, -1, block).cumsum(-1)
    totals = inner[..., -1]
    carry = totals.cumsum(-1) - totals  # sum of the blocks before each block
    return (inner + carry[..., None]).view(B, H, -1)[..., :S]


def compact(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, H, S] -> its first `width` set positions, ascending [B, H, width] (padded with
    0), and their counts [B, H] (at most width); no host sync."""
    B, H, S = mask.shape
    counts = mask.sum(-1).clamp(max=width)
    slot = torch.where(mask, row_cumsum(mask.int()).long() - 1, width).clamp(max=width)
    rows = torch.zeros(B, H, width + 1, dtype=torch.long, device=mask.device)
    rows.scatter_(-1, slot, torch.arange(S, device=mask.device).expand(B, H, S))
    return rows[..., :width], counts


def sigma_upper_factor(n: torch.Tensor, alpha: float) -> torch.Tensor:
    """sqrt((n-1) / chi2_alpha(n-1)): a sample std times this bounds sigma with prob 1 - alpha.

    chi2 quantile by the Wilson-Hilferty approximation (accurate to ~1% from 10 degrees of freedom).
    """
    k = (n - 1).clamp(min=1)
    z = NormalDist().inv_cdf(alpha)
    chi2 = k * (1 - 2 / (9 * k) + z * torch.sqrt(2 / (9 * k))) ** 3
    return torch.sqrt(k / chi2.clamp(min=1e-3))


def sample_z(delta: float) -> float:
    """z_{1-delta/4}: the sample's normal quantile once delta is split with the pilot's variance
    bound (which takes delta/2; see KernelBackend.pilot_budget)."""
    return NormalDist().inv_cdf(1 - delta / 4)
