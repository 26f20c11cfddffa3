"""VAttention: the user-facing settings of verified sparse attention, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from vengine.errors import ConfigError


@dataclass(frozen=True)
class VAttention:
    """Verified sparse attention (arXiv 2510.05688) settings.

    epsilon, delta: the denominator of every head's attention is estimated within relative error
        epsilon with probability at least 1 - delta.
    sink, window: first and most recent tokens, always attended exactly.
    top_k: predicted heavy hitters per KV head (one set for its GQA group of query heads), a
        fraction of the context (float < 1) or a count (int).
    base_rate: the pilot sample's expected size, a fraction of the residual rows (32 at least);
        it estimates the sample size, and its rows join the estimate.
    hash_bits: bits of the per-token key signature used to predict the top-k.
    seed: seed of the sampler (None: a random one per engine).
    max_sample: cap on the expected size of the sample beyond the pilot, a fraction of the context
        (None: as large as the CLT asks). It bounds each step's PCIe bytes; where it binds
        epsilon is not guaranteed, and the certificate (Completion.stats) counts those heads.
    """

    epsilon: float = 0.05
    delta: float = 0.05
    sink: int = 128
    window: int = 128
    top_k: float | int = 0.05
    base_rate: float = 0.1
    hash_bits: int = 64
    seed: int | None = None
    max_sample: float | None = None

    def __post_init__(self) -> None:
        for name in ("epsilon", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"VAttention.{name} must be a number in (0, 1), got {value!r}")
        for name in ("sink", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"VAttention.{name} must be an int >= 0, got {value!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0 or (
            isinstance(k, float) and k >= 1
        ):
            raise ConfigError(
                f"VAttention.top_k must be a fraction in [0, 1) or a count >= 0, got {k!r}"
            )
        r = self.base_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ConfigError(f"VAttention.base_rate must be in (0, 1], got {r!r}")
        b = self.hash_bits
        if isinstance(b, bool) or not isinstance(b, int) or b < 8 or b > 1024 or b % 8:
            raise ConfigError(f"VAttention.hash_bits must be a multiple of 8 in [8, 1024], got {b!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"VAttention.seed must be an int or None, got {self.seed!r}")
        c = self.max_sample
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1):
            raise ConfigError(f"VAttention.max_sample must be in (0, 1] or None, got {c!r}")

    def top_k_rows(self, context_len):
        """Predicted rows for a context length: an int, or a tensor of them (device-side)."""
        if not isinstance(context_len, int):  # a tensor: no torch import here, import stays cheap
            if isinstance(self.top_k, float):
                return (context_len.double() * self.top_k).long()
            return context_len * 0 + self.top_k
        return int(self.top_k * context_len) if isinstance(self.top_k, float) else self.top_k
