"""Attention backends by name, imported lazily so that `import vengine` stays cheap.

A spec is a registered name ("full", "vattention"), a VAttention, an object with
make_backend(pool, model_config, device) (a plug-in, e.g. the sparse baselines of vengine.eval),
or a list of those, one per layer: layers with equal specs share one backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from vengine.attention.base import AttentionBackend, BackendSpec, LayerBackends
from vengine.attention.config import VAttention
from vengine.errors import ConfigError
from vengine.models.config import ModelConfig
from vengine.offload.kv_pool import KVPool

Factory = Callable[[Any, KVPool, ModelConfig, torch.device], AttentionBackend]

# name -> "module:factory"; register_backend adds more
_BACKENDS: dict[str, str | Factory] = {
    "full": "vengine.attention.full:make_full",
    "vattention": "vengine.attention.vattention:make_vattention",
}


def register_backend(name: str, factory: Factory) -> None:
    """Make `name` a spec: factory(settings, pool, model_config, device) -> backend."""
    _BACKENDS[name] = factory


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def _factory(name: str) -> Factory:
    entry = _BACKENDS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def spec_name(spec: Any) -> str | None:
    """The registered name a spec stands for (None for a plug-in object)."""
    if isinstance(spec, VAttention):
        return "vattention"
    if isinstance(spec, str) and spec in _BACKENDS:
        return spec
    if isinstance(spec, BackendSpec):
        return None
    raise ConfigError(f"attention: expected one of {', '.join(_BACKENDS)}, "
                      f"vengine.VAttention(...) or a plug-in with make_backend, got {spec!r}",
                      field="attention")


def make_backend(spec: Any, pool: KVPool, cfg: ModelConfig, device: torch.device):
    """One backend for a spec."""
    name = spec_name(spec)
    if name is None:
        return spec.make_backend(pool, cfg, device)
    settings = VAttention() if spec == "vattention" else spec
    return _factory(name)(settings, pool, cfg, device)


def make_layer_backends(spec: Any, pool: KVPool, cfg: ModelConfig, device: torch.device,
                        window: AttentionBackend | None = None) -> LayerBackends:
    """The backend of every layer: one spec for all, or a list with one per layer; the
    sliding-window layers (cfg.window) use `window` whatever the spec. A layer's index in its
    storage (the pool's global layers, or the window rings) is what its backend is told."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec] * cfg.num_layers
    if len(specs) != cfg.num_layers:
        raise ConfigError(f"attention: a list of specs needs one per layer ({cfg.num_layers}), "
                          f"got {len(specs)}", field="attention")
    made: list[tuple[Any, AttentionBackend]] = []
    by_layer: list[AttentionBackend] = []
    index, counts = [], [0, 0]  # layers so far in the pool, in the rings
    for layer, s in enumerate(specs):
        windowed = bool(cfg.window(layer))
        index.append(counts[windowed])
        counts[windowed] += 1
        if windowed:
            by_layer.append(window)
            continue
        backend = next((b for known, b in made if known == s), None)
        if backend is None:
            backend = make_backend(s, pool, cfg, device)
            made.append((s, backend))
        by_layer.append(backend)
    return LayerBackends(by_layer, index, window)
