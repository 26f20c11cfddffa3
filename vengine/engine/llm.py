"""The public API: LLM loads a model once and generates with continuous batching.

Requests wait in a queue; up to max_batch run at once; a finished request frees its pages at
once and the next waiting one is prefilled into the batch.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Iterable, Iterator, Sequence as SequenceT
from typing import Any

import torch

from vengine.attention.registry import make_layer_backends
from vengine.attention.window import WindowAttention
from vengine.engine.config import EngineConfig
from vengine.engine.core import EngineCore, Event
from vengine.engine.memory import (PREFILL_PIECE, available_memory, gpu_state, plan_memory,
                                   runtime_config)
from vengine.engine.model_runner import ModelRunner
from vengine.engine.sampling import SamplingParams
from vengine.engine.sequence import Completion, Sequence
from vengine.engine.threads import set_threads
from vengine.errors import ConfigError, ContextLengthError
from vengine.models.loader import load_model, resolve_model
from vengine.models.tokenizer import StreamDecoder
from vengine.offload.kv_pool import KVPool

Prompt = str | list[int]


def checked_params(params: Any) -> SamplingParams:
    """params, if it is a SamplingParams (a request's, from user code or a Ray driver); a one-line
    ConfigError naming `params` otherwise."""
    if not isinstance(params, SamplingParams):
        raise ConfigError(f"params: expected vengine.SamplingParams, got {type(params).__name__}",
                          field="params")
    return params


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
        attention: Any = "vattention",
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
        set_threads(cfg.threads)  # before the load: dequantising runs on these threads too
        before = torch.cuda.memory_allocated(cfg.device) if cfg.device.type == "cuda" else 0
        self._gpu_budget = cfg.gpu_mem or available_memory(cfg.device)  # free at start
        self.model, self.tokenizer = load_model(resolve_model(model), cfg.device, cfg.dtype,
                                                 cfg.weights)
        scaling = self.model.config.rope_scaling
        if scaling is not None and scaling.kind == "longrope":  # fixed by the context, as vLLM
            self.model.init_rope(cfg.device, long=cfg.max_context > scaling.original_max_position)
        self._weights_bytes = (torch.cuda.memory_allocated(cfg.device) - before
                               if cfg.device.type == "cuda" else 0)
        self._build_runtime()

    def _build_runtime(self) -> None:
        """The KV pool, attention backends and runner for self.config (the model is separate),
        sized by the memory plan. Sliding-window layers whose window is shorter than the
        context keep their KV in rings on the device; the pool holds the global layers'."""
        cfg = self.config
        mc = runtime_config(self.model.config, cfg.max_context)
        kv_device = torch.device("cpu") if cfg.offloaded else cfg.device
        pin = cfg.offloaded and cfg.device.type == "cuda" and bool(mc.global_layers)
        dtype_bytes, fp8 = cfg.dtype.itemsize, cfg.kv_dtype == "fp8"
        on_gpu = cfg.device.type == "cuda"
        windows = [mc.window(i) for i in range(mc.num_layers) if mc.window(i)]
        slots = 2 * cfg.max_batch  # rings for the running requests and chat sessions kept
        ring = WindowAttention.ring_bytes(len(windows), max(windows, default=0), mc.num_kv_heads,
                                          mc.head_dim, dtype_bytes) * slots
        self.memory = plan_memory(
            mc, dtype_bytes=dtype_bytes, page_size=cfg.page_size, max_context=cfg.max_context,
            max_batch=cfg.max_batch, host_mem=cfg.host_mem,
            host_available=available_memory(torch.device("cpu")),
            prefill_chunk=cfg.prefill_chunk, prefill_piece=PREFILL_PIECE[cfg.device.type],
            kv_on_host=cfg.offloaded,
            gpu_mem=self._gpu_budget if on_gpu else None, weights_bytes=self._weights_bytes,
            state=gpu_state(mc, cfg.attention, dtype_bytes, cfg.page_size, cfg.offloaded, ring,
                            fp8, cfg.max_context) if on_gpu else None,
            kv_bytes=1 if fp8 else dtype_bytes)
        self.pool = KVPool(len(mc.global_layers), mc.num_kv_heads, mc.head_dim, cfg.page_size,
                           self.memory.num_pages, cfg.dtype, kv_device, pin, fp8, cfg.device,
                           cfg.max_context)
        window = WindowAttention(len(windows), windows[0], mc.num_kv_heads, mc.head_dim, slots,
                                 cfg.dtype, cfg.device, mc.attn_softcap or 0.0) if windows else None
        self.backends = make_layer_backends(cfg.attention, self.pool, mc, cfg.device, window)
        self.runner = ModelRunner(self.model, self.pool, self.backends, cfg.device,
                                  self.memory.prefill_chunk, self.memory.prefill_piece,
                                  cfg.cuda_graphs)
        self._next_id = 0

    def with_attention(self, attention: Any) -> LLM:
        """Another LLM over the same loaded model and tokenizer with a different attention."""
        other = object.__new__(LLM)
        other.config = dataclasses.replace(self.config, attention=attention)
        other.model, other.tokenizer = self.model, self.tokenizer
        other._gpu_budget, other._weights_bytes = self._gpu_budget, self._weights_bytes
        other._build_runtime()
        return other

    # -- public API ---------------------------------------------------------------------------

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-attention logits [len, vocab] (float32, on CPU) for every position."""
        seq = self.new_request(self._check_prompt(token_ids, need_room=False), SamplingParams())
        try:
            return self.runner.prefill(seq, all_logits=True).cpu()
        finally:
            self.release(seq)

    def generate(self, prompts: Prompt | SequenceT[Prompt], **sampling: Any) -> list[Completion]:
        """Complete one prompt or a list of prompts (text or token ids); returns one per prompt."""
        params = SamplingParams(**sampling)
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ConfigError("prompts: expected a string, a list of token ids, or a list of "
                              f"those, got {type(prompts).__name__}", field="prompts")
        seqs = [self.new_request(self._encode(p), params) for p in prompts]
        for _ in self.run(seqs):
            pass
        return [self.completion(s) for s in seqs]

    def completions(
        self, requests: Iterable[tuple[Any, Prompt, SamplingParams]]
    ) -> Iterator[tuple[Any, Completion]]:
        """Yield (key, Completion) for (key, prompt, params) requests in the order they finish.

        Requests are read lazily, as slots free up, so the iterable may be long or endless.
        """
        seqs = (self.new_request(self._encode(p), checked_params(params), key)
                for key, p, params in requests)
        for event in self.run(seqs):
            if event.finished:
                yield event.seq.key, self.completion(event.seq)

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> Completion:
        """One assistant reply to a conversation, through the model's chat template."""
        return self.generate([self.chat_ids(messages)], **sampling)[0]

    def stream(self, prompt: Prompt, **sampling: Any) -> Iterator[str]:
        """Yield the completion's text piece by piece as it is generated."""
        seq = self.new_request(self._encode(prompt), SamplingParams(**sampling))
        for event in self.run([seq]):
            if event.text:
                yield event.text

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation through the chat template, ready for the assistant's reply."""
        bad = not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)
        if bad:
            raise ConfigError('messages: expected a list of {"role": str, "content": str} '
                              f"dicts, got {type(messages).__name__}", field="messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: Prompt | list[dict[str, str]]) -> list[int]:
        """A prompt's checked token ids: text, token ids, or a conversation through the chat
        template (what a batch tokenises up front, so that a bad row fails before any work)."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            prompt = self.chat_ids(list(prompt))
        return self._encode(prompt)

    # -- requests: what ChatSession and a server drive -----------------------------------------

    def new_request(self, ids: list[int], params: SamplingParams, key: Any = None) -> Sequence:
        """A request for checked prompt ids (key: the caller's id for it)."""
        seq = Sequence(self._next_id, ids, params, key=key)
        self._next_id += 1
        self._start_turn(seq, params)
        return seq

    def continue_request(self, seq: Sequence, ids: list[int], params: SamplingParams) -> None:
        """Make seq's prompt ids (e.g. a conversation's next turn), keeping the cached tokens that
        still match (the longest common prefix; one at least is left to prefill)."""
        cached = seq.all_ids[: seq.num_cached]
        common = next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b),
                      min(len(cached), len(ids)))
        self.runner.truncate(seq, min(common, len(ids) - 1))
        seq.prompt_ids = ids
        self._start_turn(seq, params)

    def run(self, seqs: Iterable[Sequence]) -> Iterator[Event]:
        """Continuous batching over seqs, pulled lazily (only when a slot is free and none is
        waiting); an Event per request after every token. An error or an abandoned iterator
        aborts what is still unfinished, so no pages leak."""
        core = self.engine_core()
        incoming = iter(seqs)
        try:
            while True:
                if not core.scheduler.waiting and core.scheduler.has_slot:
                    nxt = next(incoming, None)
                    if nxt is not None:
                        core.add(nxt)
                if not core.has_work():
                    return
                yield from core.step()
        finally:
            core.abort_unfinished()

    def engine_core(self) -> EngineCore:
        """A fresh engine loop over this LLM's runner and pool (run's; a server keeps one and
        interleaves add/abort with its steps, from one thread)."""
        return EngineCore(self.runner, self.pool.allocator, self.tokenizer.stop_ids,
                          self.config.max_batch, self.config.max_context, self.backends.seq_stats,
                          self.tokenizer.vocab_size)

    def release(self, seq: Sequence) -> None:
        """Free a request's pages (a chat session's cache, when the session ends)."""
        self.runner.release(seq)

    @staticmethod
    def completion(seq: Sequence) -> Completion:
        return Completion(seq.text, list(seq.output_ids), seq.finish_reason or "length", seq.stats)

    # -- internals ----------------------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._check_prompt(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return self._check_prompt(list(prompt))
        raise ConfigError("a prompt must be a string or a list of token ids, got "
                          f"{type(prompt).__name__}")

    def _check_prompt(self, ids: list[int], need_room: bool = True) -> list[int]:
        if not ids:
            raise ConfigError("the prompt is empty")
        limit = self.config.max_context - (1 if need_room else 0)
        if len(ids) > limit:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context holds {self.config.max_context} "
                "(raise --ctx / max_context, or shorten the prompt)"
            )
        vocab = min(self.model.config.vocab_size, self.tokenizer.vocab_size)  # ids that decode
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        return ids

    def _start_turn(self, seq: Sequence, params: SamplingParams) -> None:
        """Fresh sampling state for a request (or a new turn of a chat session)."""
        seq.params, seq.generator = params, None
        if not params.greedy:
            seq.generator = torch.Generator(self.config.device)
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            seq.generator.manual_seed(seed)
        seq.decoder = StreamDecoder(self.tokenizer)
        seq.output_ids, seq.text, seq.emitted, seq.finish_reason = [], "", 0, None
        seq.t_arrival = time.perf_counter()
