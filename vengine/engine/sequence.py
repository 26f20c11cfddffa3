"""One request as it moves through the engine: its tokens, its pages and its counters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vengine.engine.sampling import SamplingParams


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    stats: dict[str, Any]


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the pool
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    finish_reason: str | None = None
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first_token: float = 0.0
    t_finish: float = 0.0
    decoder: Any = None  # StreamDecoder
    stats: dict[str, Any] = field(default_factory=dict)
    key: Any = None  # the caller's id for the request
    keep_cache: bool = False  # a chat session keeps its KV between turns

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
