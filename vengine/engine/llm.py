"""The public API: LLM loads a model once and generates with continuous batching.

Requests wait in a queue; up to max_batch run at once; a finished request frees its pages at
once and the next waiting one is prefilled into the batch.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence as SequenceT
from typing import Any

import torch

from vengine.attention.registry import make_backend
from vengine.engine.config import EngineConfig
from vengine.engine.model_runner import ModelRunner
from vengine.engine.sampling import SamplingParams, sample
from vengine.engine.sequence import Completion, Sequence
from vengine.errors import ConfigError, ContextLengthError
from vengine.models.loader import load_model, resolve_model
from vengine.models.tokenizer import StreamDecoder
from vengine.offload.kv_pool import KVPool

Prompt = str | list[int]


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LLM:
    """Load a Llama-family model and generate from it.

    >>> llm = LLM()  # the default model, SmolLM2-135M-Instruct
    >>> llm.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=20).text
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        max_context: int | str = 8192,
        attention: Any = "full",
        **engine_options: Any,
    ) -> None:
        self.config = cfg = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            max_context=max_context,
            attention=attention,
            **engine_options,
        )
        self.model, self.tokenizer = load_model(resolve_model(model), cfg.device, cfg.dtype)
        self._build_runtime()

    def _build_runtime(self) -> None:
        """The KV pool, attention backend and runner for self.config (the model is separate)."""
        cfg, mc = self.config, self.model.config
        kv_device = torch.device("cpu") if cfg.offloaded else cfg.device
        pin = cfg.offloaded and cfg.device.type == "cuda"
        token_bytes = mc.kv_bytes_per_token(cfg.dtype.itemsize)
        budget = cfg.host_mem or min(
            cfg.max_batch * (cfg.max_context + cfg.page_size) * token_bytes,
            _available_memory(kv_device) // 2,
        )
        self.pool = KVPool(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.page_size, budget,
                           cfg.dtype, kv_device, pin)
        self.backend = make_backend(cfg.attention, self.pool, mc, cfg.device)
        self.runner = ModelRunner(self.model, self.pool, self.backend, cfg.device, cfg.prefill_chunk,
                                  cfg.cuda_graphs)
        self._next_id = 0

    def with_attention(self, attention: Any) -> LLM:
        """Another LLM over the same loaded model and tokenizer with a different attention."""
        other = object.__new__(LLM)
        other.config = dataclasses.replace(self.config, attention=attention)
        other.model, other.tokenizer = self.model, self.tokenizer
        other._build_runtime()
        return other

    # -- public API ---------------------------------------------------------------------------

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-attention logits [len, vocab] (float32, on CPU) for every position."""
        seq = self._new_sequence(self._check_prompt(token_ids, need_room=False), SamplingParams())
        try:
            return self.runner.prefill(seq, all_logits=True).cpu()
        finally:
            self.runner.release(seq)

    def generate(self, prompts: Prompt | SequenceT[Prompt], **sampling: Any) -> list[Completion]:
        """Complete one prompt or a list of prompts (text or token ids); returns one per prompt."""
        params = SamplingParams(**sampling)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        seqs = [self._new_sequence(self._encode(p), params) for p in prompts]
        for _ in self._run(seqs):
            pass
        return [self._completion(s) for s in seqs]

    def completions(
        self, requests: Iterable[tuple[Any, Prompt, SamplingParams]]
    ) -> Iterator[tuple[Any, Completion]]:
        """Yield (key, Completion) for (key, prompt, params) requests in the order they finish.

        Requests are read lazily, as slots free up, so the iterable may be long or endless.
        """
        seqs = (self._new_sequence(self._encode(p), params, key) for key, p, params in requests)
        for seq, _ in self._run(seqs):
            if seq.finish_reason is not None:
                yield seq.key, self._completion(seq)

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> Completion:
        """One assistant reply to a conversation, through the model's chat template."""
        return self.generate([self.chat_ids(messages)], **sampling)[0]

    def stream(self, prompt: Prompt, **sampling: Any) -> Iterator[str]:
        """Yield the completion's text piece by piece as it is generated."""
        seq = self._new_sequence(self._encode(prompt), SamplingParams(**sampling))
        for _, delta in self._run([seq]):
            if delta:
                yield delta

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- internals ----------------------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._check_prompt(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return self._check_prompt(list(prompt))
        raise ConfigError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _check_prompt(self, ids: list[int], need_room: bool = True) -> list[int]:
        if not ids:
            raise ConfigError("the prompt is empty")
        limit = self.config.max_context - (1 if need_room else 0)
        if len(ids) > limit:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context holds {self.config.max_context} "
                "(raise --ctx / max_context, or shorten the prompt)"
            )
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        return ids

    def _new_sequence(self, ids: list[int], params: SamplingParams, key: Any = None) -> Sequence:
        seq = Sequence(self._next_id, ids, params, key=key)
        self._next_id += 1
        self._start_turn(seq, params)
        return seq

    def _start_turn(self, seq: Sequence, params: SamplingParams) -> None:
        """Fresh sampling state for a request (or a new turn of a chat session)."""
        seq.params, seq.generator = params, None
        if not params.greedy:
            seq.generator = torch.Generator(self.config.device)
            seq.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        seq.decoder = StreamDecoder(self.tokenizer)
        seq.output_ids, seq.text, seq.emitted, seq.finish_reason = [], "", 0, None
        seq.t_arrival = time.perf_counter()

    def _run(self, seqs: Iterable[Sequence]) -> Iterator[tuple[Sequence, str]]:
        """Continuous batching; yields (sequence, newly final text) after every token.

        Requests are pulled from seqs only when a slot and enough free pages are there; when
        the pages run short mid-decode, the newest sequence is preempted (its pages freed, its
        tokens recomputed later), as vLLM does.
        """
        incoming, waiting, running = iter(seqs), deque(), []
        live: set[int] = set()  # ids of sequences holding pages, freed whatever happens
        by_id: dict[int, Sequence] = {}
        try:
            while True:
                while len(running) < self.config.max_batch:
                    if not waiting:
                        nxt = next(incoming, None)
                        if nxt is None:
                            break
                        waiting.append(nxt)
                    seq = waiting[0]
                    if running and not self._fits(seq, len(running)):
                        break
                    waiting.popleft()
                    live.add(seq.seq_id)
                    by_id[seq.seq_id] = seq
                    yield from self._advance([seq], self.runner.prefill(seq)[None])
                    if seq.finish_reason is None:
                        running.append(seq)
                    else:
                        live.discard(seq.seq_id)
                if not running:
                    return
                self._make_room(running, waiting, live)
                yield from self._advance(running, self.runner.decode(running))
                for seq in running:
                    if seq.finish_reason is not None:
                        live.discard(seq.seq_id)
                        by_id.pop(seq.seq_id)
                running = [s for s in running if s.finish_reason is None]
        finally:  # an error or an abandoned stream must not leak pages
            for seq_id in live:
                seq = by_id[seq_id]
                if seq.block_table and not (seq.keep_cache and seq.finish_reason):
                    self.runner.release(seq)

    def _fits(self, seq: Sequence, num_running: int) -> bool:
        """Enough free pages for seq's prefill, keeping one page of headroom per running one."""
        alloc = self.pool.allocator
        need = alloc.pages_for(seq.num_tokens + 1) - len(seq.block_table)
        return alloc.num_free >= need + num_running

    def _make_room(self, running: list[Sequence], waiting: deque, live: set[int]) -> None:
        """Preempt the newest sequences until this decode step's new pages fit."""
        alloc = self.pool.allocator
        while len(running) > 1:
            need = sum(alloc.pages_for(s.num_cached + 1) > len(s.block_table) for s in running)
            if alloc.num_free >= need:
                return
            victim = running.pop()
            self.runner.release(victim)
            live.discard(victim.seq_id)
            waiting.appendleft(victim)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor):
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                        [s.all_ids for s in seqs])
        now = time.perf_counter()
        stop_ids = self.tokenizer.stop_ids
        for seq, token in zip(seqs, tokens):
            if not seq.output_ids:
                seq.t_first_token = now
            seq.output_ids.append(token)
            p = seq.params
            if token in stop_ids and not p.ignore_eos:
                seq.finish_reason = "stop"
            else:
                seq.text += seq.decoder.push(token)
                self._check_stop_strings(seq)
            if seq.finish_reason is None and (
                len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.config.max_context
            ):
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                if seq.finish_reason == "length":
                    seq.text += seq.decoder.flush()
                    self._check_stop_strings(seq)
                seq.t_finish = now
                seq.stats = self._stats(seq)
                if not seq.keep_cache:
                    self.runner.release(seq)
            yield seq, self._emit(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence) -> None:
        for stop in seq.params.stop:
            at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
            if at >= 0:
                seq.text, seq.finish_reason = seq.text[:at], "stop"

    @staticmethod
    def _emit(seq: Sequence) -> str:
        """New text that no stop string can still take back."""
        hold = 0 if seq.finish_reason else max((len(s) - 1 for s in seq.params.stop), default=0)
        end = max(seq.emitted, len(seq.text) - hold)
        delta, seq.emitted = seq.text[seq.emitted:end], end
        return delta

    def _stats(self, seq: Sequence) -> dict[str, Any]:
        decode_s = seq.t_finish - seq.t_first_token
        n_out = len(seq.output_ids)
        return {
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": n_out,
            "seconds": seq.t_finish - seq.t_arrival,
            "time_to_first_token_s": seq.t_first_token - seq.t_arrival,
            "decode_tokens_per_s": (n_out - 1) / decode_s if n_out > 1 and decode_s > 0 else 0.0,
            **self.backend.seq_stats(seq.seq_id),
        }

    def _completion(self, seq: Sequence) -> Completion:
        return Completion(seq.text, list(seq.output_ids), seq.finish_reason or "length", seq.stats)
