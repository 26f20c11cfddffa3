"""VAttention: the user-facing settings of verified sparse attention, checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vengine.checks import check_float, check_int, check_seed, invalid


GUARANTEES = ("denominator", "output")
LOCAL_EXACT_WIDTH = 8192  # CPU pools: exact attention measured faster up to here (exact_width)


@dataclass(frozen=True)
class VAttention:
    """Verified sparse attention (arXiv 2510.05688) settings.

    epsilon, delta: every head's attention is estimated within relative error epsilon with
        probability at least 1 - delta: its denominator (guarantee "denominator", the paper's) or
        its output vector (guarantee "output": |o_hat - o| <= epsilon |o|).
    sink, window: first and most recent tokens, always attended exactly (the window at least
        one page: a page is encoded for the predictor when full).
    top_k: predicted heavy hitters per KV head (one set for its GQA group of query heads), a
        fraction of the context (float < 1) or a count (int).
    pilot: the pilot sample's expected size in rows (a count: the CLT needs a number of samples,
        not a share of the context, so the density falls as the context grows); it estimates the
        sample size, and its rows join the estimate.
    key_bits: bits per key element of the codes the predictor scores (docs/predictors.md).
    seed: seed of the sampler (None: a random one per engine).
    max_sample: cap on the expected size of the sample beyond the pilot, a fraction of the context
        (None: as large as the CLT asks). It bounds each step's PCIe bytes; where it binds
        epsilon is not guaranteed, and the certificate (Completion.stats) counts those heads.
    exact_below: a decode step whose padded context (the batch's longest, in whole pages) is at
        most this many rows attends exactly (None: exact_width's rule). Exact is within any
        epsilon; below that width selection costs more than it saves.
    row_cache: decode batch positions (sequences) whose exact rows (sink, window, top-k) stay
        on the compute device from one step to the next (offload.row_cache): with the KV in host
        memory on a GPU, a step reads over PCIe only the exact rows it did not read the step
        before (elsewhere it only adds copies; its hit rate is still counted). The rows
        attended and the result do not change; device memory grows by about
        4 * (sink + window + top_k rows) * the KV bytes of a row per layer and position.
    """

    epsilon: float = 0.05
    delta: float = 0.05
    sink: int = 128
    window: int = 128
    top_k: float | int = 0.02
    pilot: int = 256
    key_bits: int = 3
    guarantee: str = "denominator"
    seed: int | None = None
    max_sample: float | None = None
    exact_below: int | None = None
    row_cache: int = 0

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
        check_int(self.pilot, "VAttention.pilot", lo=2)
        check_int(self.key_bits, "VAttention.key_bits", 1, 8)
        if self.guarantee not in GUARANTEES:
            raise invalid("VAttention.guarantee", " or ".join(map(repr, GUARANTEES)), self.guarantee)
        check_seed(self.seed, "VAttention.seed")
        if self.exact_below is not None:
            check_int(self.exact_below, "VAttention.exact_below", lo=0)
        check_int(self.row_cache, "VAttention.row_cache", lo=0)
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

    def exact_rows(self, context: int, page_size: int) -> int:
        """The most rows a decode step of sequences up to this context lists exactly (sink,
        window of at least a page, top-k of the padded width: a CUDA graph's block table pads
        the pages by up to an eighth, engine.model_runner.width_bucket): what a row cache keeps
        per layer, sequence and KV head."""
        padded = context + context // 8 + 3 * page_size
        return min(padded, self.sink + max(self.window, page_size) + self.top_k_rows(padded))

    def exact_width(self, local_kv: bool = False) -> int:
        """Decode steps whose padded context is at most this many rows attend exactly, unless
        exact_below says otherwise: where the rows every step reads (sink, window, pilot,
        top-k) would be at least half the context (2 * 512 / 0.96 = 1067 rows by default), and
        with the KV in local memory (a CPU pool: reading a row costs what scoring its code does)
        up to LOCAL_EXACT_WIDTH, below which exact attention measured faster (docs/user_path.md:
        15.9 against 5.6 tokens/s at 4K, 10.6 against 4.5 at 7.5K, default model, 2 cores)."""
        if self.exact_below is not None:
            return self.exact_below
        share = self.top_k if isinstance(self.top_k, float) else 0.0
        count = 0 if isinstance(self.top_k, float) else self.top_k
        rule = math.ceil(2 * (self.sink + self.window + self.pilot + count) / (1 - 2 * share))
        return max(rule, LOCAL_EXACT_WIDTH) if local_kv else rule
