"""Sparse-attention baselines at a given density, for comparison with vAttention.

All take exact scores s [B, Hq, S] (-inf past the context) of a DecodeProblem and return the
attention output [B, Hq, D] and the estimated denominator at scale exp(-log_scale).
- oracle top-k: sink + window + the true top rows (one set per GQA group), exact over them;
- hash top-k: the same with rows ranked by the hash signatures;
- uniform: sink + window exact + a uniform sample of the rest weighted n_R / b.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from vengine.attention.config import VAttention
from vengine.attention.vattention import DecodeResult, VAttentionBackend
from vengine.errors import ConfigError
from vengine.eval.activations import DecodeProblem
from vengine.kernels.reference import hash_scores


def _fixed(S: int, n: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    pos = torch.arange(S)
    return (pos < n[:, None]) & ((pos < sink) | (pos >= n[:, None] - window))  # [B, S]


def _attend(s: torch.Tensor, logw: torch.Tensor, v: torch.Tensor, log_scale: torch.Tensor):
    """s, logw: [B, Hq, S] (-inf = row not used); v: [B, Hkv, S, D]."""
    B, Hq, S = s.shape
    Hkv = v.shape[1]
    z = s + logw
    w = torch.exp(z - log_scale[..., None])
    out = torch.einsum("bhgs,bhsd->bhgd", w.view(B, Hkv, Hq // Hkv, S), v).reshape(B, Hq, -1)
    d = w.sum(-1)
    return out / d[..., None], d


def topk_attention(p: DecodeProblem, s: torch.Tensor, density: float, sink: int, window: int,
                   log_scale: torch.Tensor, use_hash: bool):
    """Exact attention over sink, window and the top rows; the query heads of a GQA group share
    one row set (the union of their best rows, filled to the density), as vAttention's do, so
    that equal density means equal bytes."""
    B, Hq, S = s.shape
    Hkv = p.k_pool.shape[1]
    G = Hq // Hkv
    live = ~torch.isinf(s[:, 0])  # [B, S]
    fixed = _fixed(S, p.context_lens, sink, window) & live
    k = max(int(density * int(p.context_lens.min())) - int(fixed[0].sum()), 0)
    rank = hash_scores(p.q, p.planes, p.sig) if use_hash else s
    rank = rank.masked_fill(fixed[:, None] | ~live[:, None], float("-inf"))
    order = rank.argsort(-1, descending=True).argsort(-1)  # 0 = best row of that query head
    best = order.view(B, Hkv, G, S).amin(2).float()  # a row's best rank in the group
    best = best.masked_fill(fixed[:, None] | ~live[:, None], float("inf"))
    chosen = fixed[:, None].expand(B, Hkv, S).clone()
    if k > 0:
        chosen.scatter_(-1, best.topk(k, dim=-1, largest=False).indices, True)
    chosen &= live[:, None]
    use = chosen.repeat_interleave(G, dim=1)
    return _attend(s.masked_fill(~use, float("-inf")), torch.zeros_like(s), p.rows(p.v_pool),
                   log_scale)


def uniform_attention(p: DecodeProblem, s: torch.Tensor, density: float, sink: int, window: int,
                      log_scale: torch.Tensor, generator: torch.Generator):
    B, Hq, S = s.shape
    Hkv = p.k_pool.shape[1]
    fixed = _fixed(S, p.context_lens, sink, window)
    live = ~torch.isinf(s[:, 0])
    resid = live & ~fixed  # [B, S]
    n_r = resid.sum(-1, keepdim=True).float()
    b = (density * p.context_lens[:, None].float() - fixed.sum(-1, keepdim=True)).clamp(min=1)
    keys = torch.rand(B, Hkv, S, generator=generator).masked_fill(~resid[:, None], 2.0)
    rank = keys.argsort(-1).argsort(-1)  # uniform without replacement: the b smallest keys
    sampled = (rank < b[:, None]) & resid[:, None]  # [B, Hkv, S]
    count = sampled.sum(-1, keepdim=True).clamp(min=1).float()
    logw = torch.where(sampled, torch.log(n_r[:, None] / count), 0.0)
    use = (sampled | fixed[:, None]).repeat_interleave(Hq // Hkv, dim=1)
    logw = logw.repeat_interleave(Hq // Hkv, dim=1)
    return _attend(s.masked_fill(~use, float("-inf")), logw, p.rows(p.v_pool), log_scale)


def relative_errors(out: torch.Tensor, d_hat: torch.Tensor, exact_out: torch.Tensor,
                    s: torch.Tensor, log_scale: torch.Tensor):
    """Per (query, head): relative output error ||o_hat - o|| / ||o|| and |D_hat - D| / D."""
    d = torch.exp(s - log_scale[..., None]).sum(-1)
    out_err = (out - exact_out).norm(dim=-1) / exact_out.norm(dim=-1).clamp(min=1e-30)
    return out_err, (d_hat - d).abs() / d


def log_scale_of(s: torch.Tensor) -> torch.Tensor:
    return s.amax(-1)





@dataclass(frozen=True)
class SparseBaseline:
    """A sparse-attention baseline to run end to end in the engine, at a fixed density:
    kind "oracle_topk", "hash_topk" or "uniform". Pass it as LLM(attention=...). It computes
    exact scores densely to pick rows, so it is for measuring quality, not speed."""

    kind: str
    density: float
    sink: int = 64
    window: int = 64
    hash_bits: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("oracle_topk", "hash_topk", "uniform"):
            raise ConfigError(f"unknown sparse baseline '{self.kind}'")
        if not 0 < self.density <= 1:
            raise ConfigError(f"baseline density must be in (0, 1], got {self.density}")

    def make_backend(self, pool, cfg, device):
        return _BaselineBackend(self, pool, cfg, device)


class _BaselineBackend(VAttentionBackend):
    """Prefill and signatures as vAttention; decode with the baseline's row choice."""

    graphable = False  # it scores on the CPU: not a CUDA-graph step

    def __init__(self, spec: SparseBaseline, pool, cfg, device) -> None:
        settings = VAttention(sink=spec.sink, window=spec.window, hash_bits=spec.hash_bits,
                              seed=spec.seed)
        super().__init__(settings, pool, cfg, device)
        self.spec = spec
        self.rng = torch.Generator().manual_seed(spec.seed)

    def decode(self, layer: int, q: torch.Tensor, ctx) -> DecodeResult:
        p = DecodeProblem(q.float().cpu(), self.pool.k[layer], self.pool.v[layer],
                          ctx.block_tables.cpu(), ctx.context_lens.cpu(),
                          self.signatures.gather(layer, ctx.block_tables).cpu(),
                          self.planes[layer].cpu())
        p.k_pool, p.v_pool = p.k_pool.float(), p.v_pool.float()
        s, _ = p.exact()
        ls = s.amax(-1)
        spec = self.spec
        if spec.kind == "uniform":
            out, d = uniform_attention(p, s, spec.density, spec.sink, spec.window, ls, self.rng)
        else:
            out, d = topk_attention(p, s, spec.density, spec.sink, spec.window, ls,
                                    use_hash=spec.kind == "hash_topk")
        B, Hq = out.shape[:2]
        Hkv = p.k_pool.shape[1]
        density = torch.full((B, Hkv), spec.density)
        return DecodeResult(out.to(q), ls, d, density.to(q.device),
                            torch.zeros(B, Hq, device=q.device))
