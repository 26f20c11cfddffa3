"""The engine loop a caller drives: add requests, abort them, step, receive events.

One `step()` is: the scheduler picks a batch, the runner computes its logits, the sampler picks a
token per request, and each request's text, stop conditions and statistics are brought up to
date; every request in the batch yields an Event. `LLM` drives it to completion for its calls; a
server would keep one and interleave add/abort with steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vengine.engine.sampling import sample
from vengine.engine.scheduler import Scheduler
from vengine.engine.sequence import Sequence
from vengine.offload.kv_pool import PageAllocator


class Runner(Protocol):
    """What the loop needs of a model runner (ModelRunner; a fake one in the tests)."""

    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Cache seq's uncached tokens; logits [V] of the last."""

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence; logits [B, V]."""

    def release(self, seq: Sequence) -> None:
        """Free the sequence's pages and backend state."""


@dataclass(frozen=True)
class Event:
    seq: Sequence
    text: str  # text that became final this step (no stop string can take it back)
    finished: bool  # this step finished the request (seq.finish_reason says why)


class EngineCore:
    def __init__(self, runner: Runner, allocator: PageAllocator, stop_ids: set[int],
                 max_batch: int, max_context: int,
                 seq_stats: Callable[[int], dict[str, Any]], vocab_size: int | None = None) -> None:
        self.runner, self.stop_ids, self.max_context = runner, stop_ids, max_context
        # a model's embedding may have padding rows past the tokenizer's ids (Qwen2.5: 151936 for
        # 151665 tokens): they are never sampled, so every output id decodes
        self.vocab_size = vocab_size
        self.seq_stats = seq_stats
        self.scheduler = Scheduler(allocator, max_batch, runner.release)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)

    def abort_unfinished(self) -> None:
        """Abort every request still waiting or running (an error, or an abandoned stream)."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.finish_reason is None:
                self.scheduler.abort(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Event]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        try:
            if batch.is_prefill:
                logits = self.runner.prefill(batch.seqs[0])[None]
            else:
                logits = self.runner.decode(batch.seqs)
        except BaseException:  # a prefilled request has left `waiting` and is not yet running:
            if batch.is_prefill:  # no abort_unfinished would find it, so free its pages here
                self.scheduler.abort(batch.seqs[0])
            raise
        events = self._advance(batch.seqs, logits)
        self.scheduler.finish_step(batch)
        return events

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        tokens = sample(logits[:, : self.vocab_size], [s.params for s in seqs],
                        [s.generator for s in seqs], [s.all_ids for s in seqs])
        now = time.perf_counter()
        events = []
        for seq, token in zip(seqs, tokens):
            if not seq.output_ids:
                seq.t_first_token = now
            seq.output_ids.append(token)
            p = seq.params
            if token in self.stop_ids and not p.ignore_eos:
                seq.finish_reason = "stop"
            else:
                seq.text += seq.decoder.push(token)
                _check_stop_strings(seq)
            if seq.finish_reason is None and (
                len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_context
            ):
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                if seq.finish_reason == "length":
                    seq.text += seq.decoder.flush()
                    _check_stop_strings(seq)
                seq.t_finish = now
                seq.stats = self._stats(seq)
            events.append(Event(seq, _emit(seq), seq.finish_reason is not None))
        return events

    def _stats(self, seq: Sequence) -> dict[str, Any]:
        decode_s, ttft = seq.t_finish - seq.t_first_token, seq.t_first_token - seq.t_arrival
        n_out = len(seq.output_ids)
        return {
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": n_out,
            "seconds": seq.t_finish - seq.t_arrival,
            "time_to_first_token_s": ttft,
            "prefill_tokens_per_s": len(seq.prompt_ids) / ttft if ttft > 0 else 0.0,
            "decode_tokens_per_s": (n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else 0.0,
            "kv_bytes": len(seq.block_table) * self.scheduler.allocator.page_bytes,  # at the end
            **self.seq_stats(seq.seq_id),
        }


def _check_stop_strings(seq: Sequence) -> None:
    for stop in seq.params.stop:
        at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
        if at >= 0:
            seq.text, seq.finish_reason = seq.text[:at], "stop"


def _emit(seq: Sequence) -> str:
    """New text that no stop string can still take back."""
    hold = 0 if seq.finish_reason else max((len(s) - 1 for s in seq.params.stop), default=0)
    end = max(seq.emitted, len(seq.text) - hold)
    delta, seq.emitted = seq.text[seq.emitted:end], end
    return delta
