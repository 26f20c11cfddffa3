"""Sampling parameters and a batched sampler (greedy, temperature, top-k, top-p, repetition penalty).

Each request owns a torch.Generator, so a seeded request gives the same tokens whatever else is
in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vengine.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"{name} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an int >= 1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0: off)")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an int or None")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a string or a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[list[int]],
) -> list[int]:
    """logits: [B, V] float32 -> one token id per row."""
    logits = logits.clone()
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0 and histories[i]:
            ids = torch.tensor(sorted(set(histories[i])), device=logits.device)
            seen = logits[i, ids]
            logits[i, ids] = torch.where(
                seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
            )
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = logits[rows] / torch.tensor([params[i].temperature for i in rows], device=logits.device)[:, None]
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        V = sub.shape[-1]
        ks = torch.tensor([params[i].top_k or V for i in rows], device=logits.device)
        ranks = torch.arange(V, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        top_ps = torch.tensor([params[i].top_p for i in rows], device=logits.device)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_ps[:, None], 0.0)
        for j, i in enumerate(rows):
            pick = torch.multinomial(probs[j], 1, generator=generators[i])
            tokens[i] = order[j, pick[0]]
    return tokens.tolist()
