"""VAttention: the user-facing settings of verified sparse attention, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from vengine.checks import check_float, check_int, check_seed, invalid


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
            check_float(getattr(self, name), f"VAttention.{name}", 0, 1, lo_open=True, hi_open=True)
        for name in ("sink", "window"):
            check_int(getattr(self, name), f"VAttention.{name}", lo=0)
        top_k = "a fraction in [0, 1) or a count >= 0"
        if isinstance(self.top_k, float):
            check_float(self.top_k, "VAttention.top_k", 0, 1, hi_open=True, want=top_k)
        else:
            check_int(self.top_k, "VAttention.top_k", lo=0, want=top_k)
        check_float(self.base_rate, "VAttention.base_rate", 0, 1, lo_open=True)
        bits = "a multiple of 8 in [8, 1024]"
        if check_int(self.hash_bits, "VAttention.hash_bits", 8, 1024, want=bits) % 8:
            raise invalid("VAttention.hash_bits", bits, self.hash_bits)
        check_seed(self.seed, "VAttention.seed")
        if self.max_sample is not None:
            check_float(self.max_sample, "VAttention.max_sample", 0, 1, lo_open=True,
                        want="a number in (0, 1] or None")

    def top_k_rows(self, context_len):
        """Predicted rows for a context length: an int, or a tensor of them (device-side)."""
        if not isinstance(context_len, int):  # a tensor: no torch import here, import stays cheap
            if isinstance(self.top_k, float):
                return (context_len.double() * self.top_k).long()
            return context_len * 0 + self.top_k
        return int(self.top_k * context_len) if isinstance(self.top_k, float) else self.top_k
