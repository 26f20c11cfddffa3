"""Attention backends by name, imported lazily so that `import vengine` stays cheap."""

from __future__ import annotations

import torch

from vengine.models.config import ModelConfig
from vengine.offload.kv_pool import KVPool


def make_backend(spec, pool: KVPool, cfg: ModelConfig, device: torch.device):
    """spec: "full", a VAttention, or any object with make_backend(pool, cfg, device) (a plug-in,
    e.g. the sparse baselines of vengine.eval)."""
    if hasattr(spec, "make_backend"):
        return spec.make_backend(pool, cfg, device)
    if spec == "full":
        from vengine.attention.full import FullAttention

        return FullAttention(pool)
    from vengine.attention.vattention import VAttentionBackend

    return VAttentionBackend(spec, pool, cfg, device)
