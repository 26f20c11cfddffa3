"""What the kernel backends share with the rest of vengine: the key codes, the group's predicted
weights, the paged layout's gathers and masks, no-sync compaction, and the sampler's constants and quantiles.

Production code (offload/, attention/, eval/) imports these from here; reference.py is the oracle.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import NamedTuple

import torch
import torch.nn.functional as F

Partial = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # base.Partial (no import: base is above)

PROPOSAL_FLOOR = 0.1  # share of the proposal spread uniformly (defensive mixture)


def encode_pages(k: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key codes of whole pages k [N, Hkv, P, D] -> codes [N, Hkv, P, bits * D / 8] uint8 and
    scales [N, Hkv, 2, D] float16 (each channel's minimum and step over the page's P rows).

    Each element is rounded to one of 2^bits levels between its channel's min and max in the
    page (per-channel, as keys carry their outliers in fixed channels). The codes are stored as
    bit planes: byte j * D / 8 + c // 8 holds bit j of channel c's code at bit c % 8, so any
    number of bits packs whole bytes. Why these: at 3 bits the group's top-2% by dequantised
    scores keeps 0.98 of the attention mass exact scores keep, against 0.21 for the 64-bit sign
    signatures they replace (docs/predictors.md), for 0.109 of the KV's bytes at D = 128.
    """
    kf = k.float()
    lo = kf.amin(2).half()
    step = ((kf.amax(2) - lo.float()) / (2**bits - 1)).half()
    lo32, step32 = lo.float()[:, :, None], step.float()[:, :, None]
    level = torch.where(step32 > 0, torch.floor((kf - lo32) / step32.clamp(min=1e-30) + 0.5), 0.0)
    code = level.clamp(0, 2**bits - 1).to(torch.int32)  # [N, Hkv, P, D]
    N, H, P, D = k.shape
    planes = (code[..., None, :] >> torch.arange(bits, device=k.device)[:, None]) & 1
    weights = 1 << torch.arange(8, device=k.device, dtype=torch.int32)
    packed = (planes.view(N, H, P, bits, D // 8, 8) * weights).sum(-1)
    return packed.view(N, H, P, bits * D // 8).to(torch.uint8), torch.stack([lo, step], 2)


def decode_keys(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [..., P, bits * D / 8], scales [..., 2, D] (encode_pages) -> the dequantised keys
    [..., P, D] float32: min + step * code."""
    D = scales.shape[-1]
    bits = codes.shape[-1] * 8 // D
    byte = codes.long().unflatten(-1, (bits, D // 8))  # [..., P, bits, D / 8]
    bit = (byte[..., None] >> torch.arange(8, device=codes.device)) & 1  # [..., bits, D/8, 8]
    level = (bit.flatten(-2) << torch.arange(bits, device=codes.device)[:, None]).sum(-2)
    lo, step = scales.float().unbind(-2)
    return lo[..., None, :] + step[..., None, :] * level.float()


def group_log_weights(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Predicted scores [B, Hq, S] (-inf where not scored) -> [B, Hkv, S]: the log of the sum
    over a GQA group's query heads of each head's softmax weight over the scored rows (the
    caller scores the sink and window too, so that they take their share of each head's mass).

    Why: the group shares one row set, and a row matters as much as the largest weight any head
    gives it. Summing the heads' queries (one score per row) lets the head with the widest
    scores drown the others: with exact keys that rule keeps 0.83-0.86 of the mass the heads'
    own top-k keep, summed weights 0.98 (docs/predictors.md). As a sampling proposal the summed
    weights are a mixture of the heads' own optimal proposals.
    """
    B, Hq, S = scores.shape
    s = scores.view(B, num_kv_heads, Hq // num_kv_heads, S)
    top = s.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    lse = torch.log(torch.exp(s - top).sum(-1, keepdim=True)).clamp(min=-1e30) + top
    return torch.logsumexp(s - lse, 2)


def ranked(s_hat: torch.Tensor, num_kv_heads: int, lo: int, hi: torch.Tensor) -> torch.Tensor:
    """The group's predicted log weights of the scores s_hat [B, Hq, S] (group_log_weights),
    -inf outside lo <= s < hi[b]: what the top-k picks from (KernelBackend.group_scores)."""
    return mask_range(group_log_weights(s_hat, num_kv_heads), lo, hi)


FP8_MAX = 448.0  # the largest finite float8 e4m3 value


class Fp8Rows(NamedTuple):
    """One layer of K or V stored as float8 e4m3: rows [pages, Hkv, P, D] (in the pool: host
    memory or the GPU) and a bfloat16 scale per row [pages, Hkv, P] (on the compute device; the
    row's value is rows * scale). Kernels take it wherever they take a pool tensor. Why one
    scale per row, kept on the GPU: a row is written once, at its token (a page's scale would be
    unknown until the page fills), and its 2 bytes would cost a PCIe read of their own.
    bfloat16, rounded up: float16 scales of rows below 0.03 underflow and clip the row's max."""

    rows: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.rows.shape

    @property
    def device(self) -> torch.device:
        return self.rows.device


def fp8_quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [..., D] -> (e4m3 [..., D], bfloat16 scale [...]): each row over its absolute max
    / FP8_MAX, the scale rounded up to bfloat16 (so no value clips), the values to nearest (the
    Triton store rounds the same, bit for bit)."""
    xf = x.float()
    exact = (xf.abs().amax(-1) / FP8_MAX).clamp(min=1e-30).view(torch.int32)
    scale = ((exact + 0xFFFF) >> 16 << 16).view(torch.float32)  # up to a bfloat16
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.bfloat16)


def pool_rows(pool, index) -> torch.Tensor:
    """pool[index] of a pool tensor or Fp8Rows (dequantised to float32, exact: 4 x 8 bits)."""
    if isinstance(pool, Fp8Rows):
        return pool.rows[index].float() * pool.scale[index].float()[..., None]
    return pool[index]


def pool_write(pool, index, x: torch.Tensor) -> None:
    """pool[index] = x, quantised where pool is Fp8Rows."""
    if isinstance(pool, Fp8Rows):
        pool.rows[index], pool.scale[index] = fp8_quantise(x)
    else:
        pool[index] = x.to(pool.dtype)


def paged_rows(pool, block_tables: torch.Tensor, dtype: torch.dtype | None = None
               ) -> torch.Tensor:
    """pool [pages, Hkv, P, ...] -> each sequence's rows in token order [B, Hkv, S, ...]
    (an Fp8Rows pool dequantised to dtype)."""
    H = (pool.rows if isinstance(pool, Fp8Rows) else pool).shape[1]
    # (page, head) indices [B, Hkv, n]: the gather lands in [B, Hkv, n, P, ...] order, so the
    # result is a view of it (a transpose after it copied every row twice: 1.8x the time)
    idx = (block_tables[:, None, :], torch.arange(H, device=block_tables.device)[None, :, None])
    if isinstance(pool, Fp8Rows):
        dtype = dtype or torch.float32
        x = pool.rows[idx].to(dtype) * pool.scale[idx].to(dtype)[..., None]
    else:
        x = pool[idx]
    B, _, n, P = x.shape[:4]
    return x.reshape(B, H, n * P, *x.shape[4:])


def gather_rows(pool, block_tables: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """pool [pages, Hkv, P, D] (or Fp8Rows: float32), rows [B, Hkv, R] -> [B, Hkv, R, D] (rows
    past the counts: garbage)."""
    P = pool.shape[2]
    B, Hkv, R = rows.shape
    pages = block_tables.gather(1, (rows // P).view(B, -1)).view(B, Hkv, R)
    heads = torch.arange(Hkv, device=rows.device)[None, :, None]
    return pool_rows(pool, (pages, heads, rows % P))


def soft_cap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2's attention soft-capping, cap * tanh(s / cap), or s where cap is 0. Applied to
    finite scores before masking (tanh(-inf) would give -cap)."""
    return scores if not cap else cap * torch.tanh(scores / cap)


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


def sigma_upper_factor(n: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """sqrt((n-1) / chi2_alpha(n-1)): a sample std times this bounds sigma with prob 1 - alpha;
    alpha a float, or a tensor of normal quantiles z_alpha (broadcast against n: one per sequence).

    chi2 quantile by the Wilson-Hilferty approximation (accurate to ~1% from 10 degrees of freedom).
    """
    k = (n - 1).clamp(min=1)
    z = NormalDist().inv_cdf(alpha) if isinstance(alpha, float) else alpha
    chi2 = k * (1 - 2 / (9 * k) + z * torch.sqrt(2 / (9 * k))) ** 3
    return torch.sqrt(k / chi2.clamp(min=1e-3))


def sample_z(delta: float) -> float:
    """z_{1-delta/4}: the sample's normal quantile once delta is split with the pilot's variance
    bound (which takes delta/2; see KernelBackend.pilot_budget)."""
    return NormalDist().inv_cdf(1 - delta / 4)


def accuracy_targets(pairs: list[tuple[float | None, float | None]]) -> torch.Tensor:
    """[B, 3] float32: each sequence's (epsilon, z_{1-delta/4}, z_{delta/2}) for pilot_budget, from
    its (epsilon, delta); NaN where it has none (the layer's own settings apply). Quantiles on the
    host, once per step, so that no layer computes them."""
    nan = float("nan")
    rows = [(nan if eps is None else eps,
             nan if delta is None else sample_z(delta),
             nan if delta is None else NormalDist().inv_cdf(delta / 2)) for eps, delta in pairs]
    return torch.tensor(rows, dtype=torch.float32).view(len(pairs), 3)


def per_sequence_target(target: torch.Tensor | None, epsilon: float, delta: float, B: int,
                        device: torch.device) -> torch.Tensor:
    """[B, 3]: accuracy_targets' rows with their NaNs replaced by (epsilon, delta)'s."""
    default = torch.tensor([epsilon, sample_z(delta), NormalDist().inv_cdf(delta / 2)],
                           device=device)
    if target is None:
        return default.expand(B, 3)
    return torch.where(torch.isnan(target), default, target)


def merge_partials(parts: list[Partial]) -> torch.Tensor:
    """Combine (m, l, acc) partials over disjoint row sets into the attention output [B, Hq, D]."""
    m = torch.stack([p[0] for p in parts]).amax(0).clamp_min(torch.finfo(torch.float32).min)
    l = sum(p[1] * torch.exp(p[0] - m) for p in parts)
    acc = sum(p[2] * torch.exp(p[0] - m)[..., None] for p in parts)
    return acc / l[..., None]
