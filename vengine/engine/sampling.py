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
    # this request's attention guarantee (vAttention: relative error epsilon with probability
    # 1 - delta); None: the engine's VAttention settings. Full attention is exact: no effect.
    epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        # Checked in full here because a value that passes Python's comparisons but not torch's
        # (NaN, inf, an int beyond int64) would otherwise crash a batch hours in, on every rerun.
        def bad(name: str, want: str) -> ConfigError:
            shown = repr(getattr(self, name))
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return ConfigError(f"{name} must be {want}, got {shown}", field=name)

        def is_int(value: object, lo: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and lo <= value < 2**63

        def in_range(value: object, lo: float, hi: float) -> bool:  # NaN fails both comparisons
            return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi

        if not is_int(self.max_new_tokens, 1):
            raise bad("max_new_tokens", "an int in [1, 2**63)")
        # Outside these bounds logits / temperature (or * penalty) overflow float32 and sampling
        # dies on NaN probabilities.
        if isinstance(self.temperature, bool) or self.temperature != 0 and not in_range(self.temperature, 1e-3, 1e3):
            raise bad("temperature", "0 (greedy) or a number in [0.001, 1000]")
        if not in_range(self.top_p, 0, 1) or self.top_p == 0:
            raise bad("top_p", "in (0, 1]")
        if not is_int(self.top_k, 0):
            raise bad("top_k", "an int >= 0 (0: off) below 2**63")
        if not in_range(self.repetition_penalty, 1e-3, 1e3):
            raise bad("repetition_penalty", "a number in [0.001, 1000]")
        if self.seed is not None and not is_int(self.seed, -2**63):
            raise bad("seed", "an int in [-2**63, 2**63) or None")
        for name in ("epsilon", "delta"):
            value = getattr(self, name)
            if value is not None and (not in_range(value, 0, 1) or value in (0, 1)):
                raise bad(name, "in (0, 1) or None (the engine's)")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a bool")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
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
