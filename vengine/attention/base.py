"""The seam between the model and attention: what every backend provides, and which layer uses
which backend.

The engine drives a step explicitly: `begin_step` (host bookkeeping before the forward), one
`prefill` or `decode` call per layer, `step_stats` at the end of the forward (device tensors, so
that a CUDA graph records the reduction too), then `end_step` with those statistics once the
step has run (or its graph has been replayed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from vengine.attention.context import StepContext


class SequenceView(Protocol):
    """What a backend may read of a request (the engine's Sequence has these)."""

    seq_id: int
    num_cached: int  # tokens whose K/V are in the pool
    block_table: list[int]  # the request's pages, in token order


@runtime_checkable
class AttentionBackend(Protocol):
    name: str
    graphable: bool  # its decode may be captured in a CUDA graph
    generator: torch.Generator | None  # device RNG a CUDA graph must register (None: no draws)

    def begin_step(self, seqs: Sequence[SequenceView], is_prefill: bool) -> None:
        """Host bookkeeping before a step over these sequences (no device waits)."""

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: StepContext) -> torch.Tensor:
        """Store a prompt chunk's K/V [T, Hkv, D]; attend causally: q [T, Hq, D] -> [T, Hq, D]."""

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               ctx: StepContext) -> torch.Tensor:
        """Store one new K/V row per sequence and attend: q [B, Hq, D] -> [B, Hq, D]."""

    def step_stats(self) -> torch.Tensor | None:
        """The decode step's statistics [B, k] so far, reduced on the device; resets them."""

    def end_step(self, seq_ids: tuple[int, ...], stats: torch.Tensor | None) -> None:
        """Fold a finished decode step's statistics into each sequence's totals."""

    def free(self, seq_id: int) -> None:
        """Forget a sequence's per-sequence state (its pages are freed by the engine)."""

    def seq_stats(self, seq_id: int) -> dict[str, float]:
        """What Completion.stats reports for a sequence."""


@runtime_checkable
class BackendSpec(Protocol):
    """A plug-in attention (e.g. the sparse baselines of vengine.eval): LLM(attention=spec)."""

    def make_backend(self, pool: Any, model_config: Any, device: torch.device) -> AttentionBackend:
        """The backend for a pool (offload.KVPool) and a model (models.ModelConfig)."""


class LayerBackends:
    """The backend of each layer. Layers may use different backends (e.g. exact attention in some
    layers, sparse in others); those that share one backend object share its state."""

    def __init__(self, by_layer: Sequence[AttentionBackend], index: Sequence[int] | None = None,
                 window: Any = None) -> None:
        self.by_layer = tuple(by_layer)
        self.index = tuple(index) if index is not None else tuple(range(len(self.by_layer)))
        self.unique = tuple({id(b): b for b in self.by_layer}.values())
        self.window = window  # attention.window.WindowAttention of the sliding-window layers

    def __getitem__(self, layer: int) -> AttentionBackend:
        return self.by_layer[layer]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: StepContext) -> torch.Tensor:
        backend, i = self.by_layer[layer], self.index[layer]
        if ctx.is_prefill:
            return backend.prefill(i, q, k, v, ctx)
        return backend.decode(i, q, k, v, ctx)

    def kept(self, seq_id: int, cached: int, keep: int) -> int:
        """Cached tokens that stay valid when a request keeps its first `keep` (a chat turn):
        the sliding-window rings may not reach back that far."""
        return keep if self.window is None else self.window.kept(seq_id, cached, keep)

    @property
    def graphable(self) -> bool:
        return all(b.graphable for b in self.unique)

    @property
    def generators(self) -> list[torch.Generator]:
        return [b.generator for b in self.unique if b.generator is not None]

    def begin_step(self, seqs: Sequence[SequenceView], is_prefill: bool) -> None:
        for b in self.unique:
            b.begin_step(seqs, is_prefill)

    def step_stats(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(b.step_stats() for b in self.unique)

    def end_step(self, seq_ids: tuple[int, ...], stats: tuple[torch.Tensor | None, ...]) -> None:
        for b, s in zip(self.unique, stats):
            b.end_step(seq_ids, s)

    def free(self, seq_id: int) -> None:
        for b in self.unique:
            b.free(seq_id)

    def seq_stats(self, seq_id: int) -> dict[str, float]:
        """One backend's statistics as they are; several: the density averaged over the global
        layers (a sliding-window layer reads its window, not the context), other counters from
        the first backend that reports them."""
        if len(self.unique) == 1:
            return self.unique[0].seq_stats(seq_id)
        per = {id(b): b.seq_stats(seq_id) for b in self.unique}
        stats: dict[str, float] = {}
        for b in self.unique:
            for key, value in per[id(b)].items():
                stats.setdefault(key, value)
        pooled = [b for b in self.by_layer if b is not self.window]  # density: of the context
        stats["density"] = sum(per[id(b)]["density"] for b in pooled) / len(pooled)
        return stats
