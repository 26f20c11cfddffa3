"""Sparse-attention baselines at a given density, for comparison with vAttention.

All take exact scores s [B, Hq, S] (-inf past the context) of a DecodeProblem and return the
attention output [B, Hq, D] and the estimated denominator at scale exp(-log_scale).
- oracle top-k: sink + window + the true top rows (one set per GQA group), exact over them;
- predictor top-k: the same with rows ranked by vAttention's predictor (the key codes);
- uniform: sink + window exact + a uniform sample of the rest weighted n_R / b.
A GQA group ranks its rows as vAttention's top-k does (common.group_log_weights of its heads'
scores): so equal density means equal bytes and the same group rule. OracleVAttention is vAttention with the exact scores as predictor
(the paper's vAttention(oracle top-k)).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vengine.attention.config import VAttention
from vengine.attention.vattention import DecodeResult, VAttentionBackend, vattention_decode
from vengine.errors import ConfigError
from vengine.eval.activations import DecodeProblem
from vengine.kernels.base import KernelBackend
from vengine.kernels.common import group_log_weights, mask_range, pool_rows, ranked
from vengine.kernels.reference import key_scores


def fixed_mask(S: int, n: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """The rows every sparse method attends exactly: sink and window of each context n [B]."""
    pos = torch.arange(S, device=n.device)
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


def predicted_group_scores(p: DecodeProblem) -> torch.Tensor:
    """vAttention's top-k ranking of a GQA group's rows [B, Hkv, S]: the summed softmax weights
    of its heads' scores against the decoded keys (every row of the context scored); -inf past
    each context."""
    Hkv, D = p.k_pool.shape[1], p.q.shape[-1]
    s_hat = key_scores(p.q, p.codes, p.block_tables, 0, p.context_lens, D ** -0.5, p.softcap)
    return group_log_weights(s_hat, Hkv)


class _OracleKernels:
    """kernels whose group_scores rank the exact scores s [B, Hq, S]; every other op is the
    wrapped backend's."""

    def __init__(self, kernels: KernelBackend, s: torch.Tensor) -> None:
        self.s = s
        self.store_rows, self.pick_top = kernels.store_rows, kernels.pick_top
        self.exact_rows, self.proposal_params = kernels.exact_rows, kernels.proposal_params
        self.pilot_rows, self.second_rows = kernels.pilot_rows, kernels.second_rows
        self.row_scores, self.partial_attention = kernels.row_scores, kernels.partial_attention
        self.pilot_budget, self.finish = kernels.pilot_budget, kernels.finish

    def group_scores(self, q: torch.Tensor, codes, block_tables: torch.Tensor, hi: torch.Tensor,
                     sink: int, rank_hi: torch.Tensor, scale: float, softcap: float = 0.0
                     ) -> torch.Tensor:
        return ranked(mask_range(self.s.clamp(min=-1e30), 0, hi), codes[0].shape[1], sink,
                      rank_hi)


def oracle_kernels(kernels: KernelBackend, s: torch.Tensor) -> KernelBackend:
    """A kernel backend whose predictor returns the exact scores s [B, Hq, S] (ranked by the same
    group rule): vAttention(oracle top-k)."""
    return _OracleKernels(kernels, s)


def topk_attention(p: DecodeProblem, s: torch.Tensor, density: float, sink: int, window: int,
                   log_scale: torch.Tensor, predicted: bool):
    """Exact attention over sink, window and the group's top rows, filled to the density (the
    query heads of a GQA group share one row set, as vAttention's do)."""
    B, Hq, S = s.shape
    Hkv = p.k_pool.shape[1]
    live = ~torch.isinf(s[:, 0])  # [B, S]
    fixed = fixed_mask(S, p.context_lens, sink, window) & live
    k = max(int(density * int(p.context_lens.min())) - int(fixed[0].sum()), 0)
    rank = predicted_group_scores(p) if predicted else group_log_weights(s, Hkv)
    rank = rank.masked_fill(fixed[:, None] | ~live[:, None], float("-inf"))
    chosen = fixed[:, None].expand(B, Hkv, S).clone()
    if k > 0:
        chosen.scatter_(-1, rank.topk(min(k, S), dim=-1).indices, True)
    chosen &= live[:, None]
    use = chosen.repeat_interleave(Hq // Hkv, dim=1)
    return _attend(s.masked_fill(~use, float("-inf")), torch.zeros_like(s), p.rows(p.v_pool),
                   log_scale)


def uniform_attention(p: DecodeProblem, s: torch.Tensor, density: float, sink: int, window: int,
                      log_scale: torch.Tensor, generator: torch.Generator):
    B, Hq, S = s.shape
    Hkv = p.k_pool.shape[1]
    fixed = fixed_mask(S, p.context_lens, sink, window)
    live = ~torch.isinf(s[:, 0])
    resid = live & ~fixed  # [B, S]
    n_r = resid.sum(-1, keepdim=True).float()
    b = (density * p.context_lens[:, None].float() - fixed.sum(-1, keepdim=True)).clamp(min=1)
    keys = torch.rand(B, Hkv, S, generator=generator, device=s.device)
    keys = keys.masked_fill(~resid[:, None], 2.0)
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


BASELINES = ("oracle_topk", "predictor_topk", "uniform")


@dataclass(frozen=True)
class SparseBaseline:
    """A sparse-attention baseline to run end to end in the engine, at a fixed density:
    kind "oracle_topk", "predictor_topk" or "uniform". Pass it as LLM(attention=...). It computes
    exact scores densely to pick rows, so it is for measuring quality, not speed."""

    kind: str
    density: float
    sink: int = 64
    window: int = 64
    key_bits: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in BASELINES:
            raise ConfigError(f"unknown sparse baseline '{self.kind}'")
        if not 0 < self.density <= 1:
            raise ConfigError(f"baseline density must be in (0, 1], got {self.density}")

    def make_backend(self, pool, cfg, device):
        return _BaselineBackend(self, pool, cfg, device)


def engine_problem(backend: VAttentionBackend, layer: int, q: torch.Tensor, ctx) -> DecodeProblem:
    """This decode step of one layer as a float32 DecodeProblem on the engine's device: the
    sequences' pages gathered from the pool (over PCIe through the UVA view on a GPU: every row of
    the context, which is fine for measuring quality and is why these backends are not fast)."""
    bt = ctx.block_tables
    pages = bt.flatten()
    k = pool_rows(backend.pool.k_layer(layer), pages).float()
    v = pool_rows(backend.pool.v_layer(layer), pages).float()
    tables = torch.arange(len(pages), device=bt.device).view(bt.shape)
    codes, scales = backend.codes.layer(layer)
    return DecodeProblem(q.float(), k, v, tables, ctx.context_lens,
                         (codes[pages], scales[pages]), backend.softcap)


class _BaselineBackend(VAttentionBackend):
    """Prefill and key codes as vAttention; decode with the baseline's row choice."""

    graphable = False  # the row choice reads counts on the host

    def __init__(self, spec: SparseBaseline, pool, cfg, device) -> None:
        settings = VAttention(sink=spec.sink, window=spec.window, key_bits=spec.key_bits,
                              seed=spec.seed, exact_below=0)  # the baseline at every length
        super().__init__(settings, pool, cfg, device)
        self.spec = spec
        self.rng = torch.Generator(device).manual_seed(spec.seed)

    def estimate(self, layer: int, q: torch.Tensor, ctx) -> DecodeResult:
        p = engine_problem(self, layer, q, ctx)
        s, _ = p.exact()
        ls = s.amax(-1)
        spec = self.spec
        if spec.kind == "uniform":
            out, d = uniform_attention(p, s, spec.density, spec.sink, spec.window, ls, self.rng)
        else:
            out, d = topk_attention(p, s, spec.density, spec.sink, spec.window, ls,
                                    predicted=spec.kind == "predictor_topk")
        B, Hq = out.shape[:2]
        density = torch.full((B, p.k_pool.shape[1]), spec.density, device=q.device)
        zeros = torch.zeros(B, Hq, device=q.device)
        return DecodeResult(out.to(q), ls, d, density, zeros, zeros)


@dataclass(frozen=True)
class OracleVAttention:
    """vAttention whose top-k predictor is the exact scores (the paper's vAttention(oracle
    top-k)), to run end to end in the engine: LLM(attention=OracleVAttention(VAttention(...))).
    It scores every row of the context, so it is for measuring quality, not speed."""

    settings: VAttention

    def make_backend(self, pool, cfg, device):
        return _OracleBackend(self.settings, pool, cfg, device)


class _OracleBackend(VAttentionBackend):
    graphable = False  # float32 copies of the whole context each step: not worth a graph

    def estimate(self, layer: int, q: torch.Tensor, ctx) -> DecodeResult:
        p = engine_problem(self, layer, q, ctx)
        s, _ = p.exact()
        r = vattention_decode(p.q, p.k_pool, p.v_pool, p.block_tables, p.context_lens, p.codes,
                              self.cfg, self.generator, oracle_kernels(self.kernels, s),
                              softcap=p.softcap, target=ctx.targets)
        return replace(r, out=r.out.to(q.dtype))
