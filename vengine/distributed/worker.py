"""One engine worker: an `LLM` and one `EngineCore` kept across calls, so that the requests the
driver adds between calls join the running batch (continuous batching inside every worker).

A plain class that the pool makes a Ray actor: this module never imports Ray. Errors the driver
must show as one line (a memory plan that does not fit, a bad prompt) come back as values."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Any

import torch

from vengine.engine.llm import LLM, Prompt, checked_params
from vengine.engine.sequence import Completion
from vengine.errors import VengineError


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    device: str
    threads: int
    max_batch: int


class EngineWorker:
    def __init__(self, engine_options: dict[str, Any]) -> None:
        self.error: VengineError | None = None
        try:
            self.llm = LLM(**engine_options)
        except VengineError as e:  # ready() hands it to the driver
            self.error = e
            return
        self.core = self.llm.engine_core()

    def ready(self) -> WorkerInfo | VengineError:
        if self.error is not None:
            return self.error
        cfg = self.llm.config
        return WorkerInfo(os.getpid(), str(cfg.device), torch.get_num_threads(), cfg.max_batch)

    def prompt_ids(self, prompt: Prompt | list[dict[str, str]]) -> list[int] | VengineError:
        try:
            return self.llm.prompt_ids(prompt)
        except VengineError as e:
            return e

    def advance(self, requests: list[tuple[Any, Prompt, Any]]) -> list[tuple[Any, Completion]]:
        """Add (key, prompt, params) requests, then step until one at least finishes: the
        finished ones. An error aborts whatever this worker holds (the driver ends the run)."""
        try:
            for key, prompt, params in requests:
                seq = self.llm.new_request(self.llm.prompt_ids(prompt), checked_params(params), key)
                self.core.add(seq)
            while self.core.has_work():
                finished = [(e.seq.key, self.llm.completion(e.seq)) for e in self.core.step()
                            if e.finished]
                if finished:
                    return finished
            return []
        except BaseException:
            self.core.abort_unfinished()
            raise

    def abort_all(self) -> None:
        """Drop every request held (the driver abandoned its stream)."""
        self.core.abort_unfinished()

    def peak_memory(self) -> dict[str, int]:
        """Bytes: the GPU's peak allocation (0 on CPU) and this process's peak resident set."""
        gpu = torch.cuda.max_memory_allocated() if self.llm.config.device.type == "cuda" else 0
        return {"gpu_bytes": gpu, "host_rss_bytes": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss * 1024}
