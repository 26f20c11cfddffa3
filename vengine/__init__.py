"""vengine: long-context LLM inference with the KV cache in host memory and verified sparse attention.

Importing vengine is cheap: torch and the model code load on first use of LLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vengine.attention.config import VAttention
from vengine.errors import (
    ConfigError,
    ContextLengthError,
    HostMemoryError,
    ModelLoadError,
    VengineError,
)

if TYPE_CHECKING:
    from vengine.engine.llm import LLM
    from vengine.engine.sampling import SamplingParams
    from vengine.engine.sequence import Completion

__version__ = "0.1.0"
__all__ = ["LLM", "Completion", "SamplingParams", "VAttention", "VengineError", "ModelLoadError",
           "ConfigError", "ContextLengthError", "HostMemoryError"]

_LAZY = {"LLM": "vengine.engine.llm", "Completion": "vengine.engine.sequence",
         "SamplingParams": "vengine.engine.sampling"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vengine' has no attribute {name!r}")
