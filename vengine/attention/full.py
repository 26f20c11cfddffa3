"""Exact attention over every cached row (torch SDPA): the reference every sparse path must match.

`prefill_attention` is the one prefill of every backend: exact and causal, over the chunk alone or
over the cached prefix gathered from the pool. A model that soft-caps its scores (Gemma 2's
`attn_softcap`) attends through `sdpa`'s explicit path instead: SDPA has no score hook.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vengine.attention.base import SequenceView
from vengine.attention.context import StepContext
from vengine.kernels import get_kernels
from vengine.kernels.common import soft_cap
from vengine.offload.kv_pool import KVPool

CAPPED_QUERY_BLOCK = 256  # queries per block of the explicit path: [block, S] scores per head


def sdpa(qh, kh, vh, mask=None, softcap: float = 0.0) -> torch.Tensor:
    """F.scaled_dot_product_attention with K/V heads shared by groups of query heads: qh
    [N, Hq, T, D], kh, vh [N, Hkv, S, D], mask bool broadcastable to [N, 1, T, S] (True:
    attend). With softcap, scores are capped (common.soft_cap) before the mask, computed
    explicitly in float32, CAPPED_QUERY_BLOCK queries at a time so that no [T, S] block of
    every head is held at once."""
    if not softcap:
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                              enable_gqa=kh.shape[1] != qh.shape[1])
    N, Hq, T, D = qh.shape
    Hkv, S = kh.shape[1], kh.shape[2]
    qg = qh.view(N, Hkv, Hq // Hkv, T, D)
    kf, vf = kh.float()[:, :, None], vh.float()[:, :, None]  # [N, Hkv, 1, S, D]
    m5 = None if mask is None else mask.expand(N, 1, T, S)[:, :, None]  # [N, 1, 1, T, S]
    out = torch.empty_like(qg)
    for t0 in range(0, T, CAPPED_QUERY_BLOCK):  # a prefill loop over query blocks
        t1 = min(t0 + CAPPED_QUERY_BLOCK, T)
        s = soft_cap(qg[:, :, :, t0:t1].float() @ kf.transpose(-1, -2) * D ** -0.5, softcap)
        if m5 is not None:
            s = s.masked_fill(~m5[..., t0:t1, :], float("-inf"))
        out[:, :, :, t0:t1] = (torch.softmax(s, -1) @ vf).to(out.dtype)
    return out.view(N, Hq, T, D)


def causal_attention(q, k, v, cached_len: int, softcap: float = 0.0) -> torch.Tensor:
    """q: [T, Hq, D] new queries at positions cached_len..; k, v: [S, Hkv, D] -> [T, Hq, D]."""
    return causal_attention_heads(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], cached_len,
                                  softcap)


def causal_attention_heads(q, kh, vh, cached_len: int, softcap: float = 0.0) -> torch.Tensor:
    """q: [T, Hq, D]; kh, vh: [1, Hkv, S, D] (a gathered prefix, as it lies) -> [T, Hq, D].

    A chunk after a cached prefix uses a lower-right causal bias, which the memory-efficient
    kernel takes directly (no [T, S] mask) but only with one K/V head per query head: on a GPU
    it runs once per query head of each GQA group instead of repeating K/V per query head,
    which would copy (group - 1) x the prefix (1.5 GiB per layer at 128K on Llama-8B shapes).
    """
    T, Hq, D = q.shape
    Hkv, S = kh.shape[1], kh.shape[2]
    qh = q.transpose(0, 1)[None]
    if softcap:  # lower-right causal: query t sees keys up to S - T + t
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return sdpa(qh, kh, vh, mask, softcap)[0].transpose(0, 1)
    if cached_len == 0 and S == T:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        return o[0].transpose(0, 1)
    # imported here: torch.nn.attention.bias pulls in torch._dynamo, 1.9 s of every start
    from torch.nn.attention.bias import causal_lower_right

    group, bias = Hq // Hkv, causal_lower_right(T, S)
    if not q.is_cuda:  # CPU: one call over repeated K/V measured faster (0.26 s vs 0.30 s)
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)[0].transpose(0, 1)
    qg = qh.view(1, Hkv, group, T, D)
    o = torch.empty((1, Hkv, group, T, D), dtype=q.dtype, device=q.device)
    for j in range(group):  # a prefill loop (a few iterations per layer), not a decode one
        o[:, :, j] = F.scaled_dot_product_attention(qg[:, :, j], kh, vh, attn_mask=bias)
    return o.view(1, Hq, T, D)[0].transpose(0, 1)


def decode_attention(q, k, v, context_lens, softcap: float = 0.0) -> torch.Tensor:
    """q: [B, Hq, D]; k, v: [B, Hkv, S, D] padded; context_lens: [B] -> [B, Hq, D].

    The query heads of a GQA group share their KV head, so q is viewed as [B, Hkv, group, D].
    Padded rows are masked, and must be finite (KVPool zero-fills): 0 * NaN is NaN.
    """
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    mask = (torch.arange(S, device=q.device)[None, :] < context_lens[:, None])[:, None, None, :]
    o = sdpa(q.view(B, Hkv, Hq // Hkv, D), k, v, mask, softcap)
    return o.reshape(B, Hq, D)


def pool_decode_attention(pool: KVPool, layer: int, q, ctx: StepContext,
                          softcap: float = 0.0) -> torch.Tensor:
    """Exact decode of q [B, Hq, D] over every stored row of the step's sequences."""
    kc, vc = pool.gather_pages(layer, ctx.block_tables, q.dtype)
    return decode_attention(q, kc, vc, ctx.context_lens, softcap)


def prefill_attention(pool: KVPool, layer: int, q, k, v, ctx: StepContext,
                      softcap: float = 0.0) -> torch.Tensor:
    """Causal attention of a prompt chunk (its K/V already stored) over its sequence so far."""
    if ctx.cached_len == 0:  # the whole context is in this chunk: no gather needed
        return causal_attention(q, k, v, 0, softcap)
    kc, vc = pool.gather_pages(layer, ctx.block_tables, q.dtype)
    S = ctx.cached_len + q.shape[0]
    return causal_attention_heads(q, kc[:, :, :S], vc[:, :, :S], ctx.cached_len, softcap)


def make_full(settings, pool: KVPool, cfg, device) -> FullAttention:
    return FullAttention(pool, cfg.attn_softcap or 0.0)


class FullAttention:
    """Stores new K/V in the pool and attends exactly over all of a sequence's rows."""

    name = "full"
    graphable = True
    generator = None

    def __init__(self, pool: KVPool, softcap: float = 0.0) -> None:
        self.pool, self.softcap = pool, softcap
        self.kernels = get_kernels(pool.k_view.device, pool.dtype)

    def store(self, layer: int, k, v, ctx: StepContext) -> None:
        with self.pool.writing(layer, ctx.slots, k, v):
            self.kernels.store_rows(k, v, ctx.slots, self.pool.k_layer(layer),
                                    self.pool.v_layer(layer))

    def prefill(self, layer: int, q, k, v, ctx: StepContext) -> torch.Tensor:
        self.store(layer, k, v, ctx)
        return prefill_attention(self.pool, layer, q, k, v, ctx, self.softcap)

    def decode(self, layer: int, q, k, v, ctx: StepContext) -> torch.Tensor:
        self.store(layer, k, v, ctx)
        return pool_decode_attention(self.pool, layer, q, ctx, self.softcap)

    def begin_step(self, seqs: Sequence[SequenceView], is_prefill: bool) -> None:
        """Nothing to prepare: every row is where decode reads it."""

    def step_stats(self) -> None:
        """No per-step statistics."""

    def end_step(self, seq_ids: tuple[int, ...], stats: None) -> None:
        """No per-step statistics to fold."""

    def free(self, seq_id: int) -> None:
        """Nothing per sequence beyond its pages, which the engine frees."""

    def seq_stats(self, seq_id: int) -> dict[str, float]:
        return {"density": 1.0}
