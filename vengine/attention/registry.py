"""Attention backends by name, imported lazily so that `import vengine` stays cheap."""

from __future__ import annotations

import torch

from vengine.attention.config import VAttention
from vengine.models.config import ModelConfig
from vengine.offload.kv_pool import KVPool


def make_backend(spec: str | VAttention, pool: KVPool, cfg: ModelConfig, device: torch.device):
    if spec == "full":
        from vengine.attention.full import FullAttention

        return FullAttention(pool)
    from vengine.attention.vattention import VAttentionBackend

    return VAttentionBackend(spec, pool, cfg, device)
