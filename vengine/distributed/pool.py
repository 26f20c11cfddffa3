"""Data-parallel generation: N engine workers on Ray, fed lazily by one driver.

Each worker holds at most `slots` requests (its max_batch): the driver gives it new ones only as
its own finish, so long and short requests balance. One `advance` call (add, step until one
finishes) is in flight per worker, and the driver waits on all of them with `ray.wait`; what a
dead worker held goes back to the front of the queue for the others. Only the driver sees the
results, so only it writes them (the CLI through the same output file as a single engine).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vengine.distributed.cluster import Cluster
from vengine.distributed.config import PoolConfig
from vengine.distributed.worker import EngineWorker, WorkerInfo
from vengine.engine.llm import Prompt
from vengine.engine.sequence import Completion
from vengine.errors import VengineError, one_line

Request = tuple[Any, Prompt, Any]  # (key, prompt, SamplingParams), as LLM.completions takes


@dataclass(eq=False)
class Worker:
    actor: Any
    info: WorkerInfo | None = None  # once it has loaded its engine
    held: dict[int, Request] = field(default_factory=dict)  # ticket -> request, unfinished
    call: Any = None  # the advance in flight (an ObjectRef), None when idle


class EnginePool:
    """N workers running `LLM(**engine_options)`; a context manager (close kills them, and the
    local cluster if the pool started one).

    >>> with EnginePool(PoolConfig(workers=2), max_context=4096) as pool:
    ...     for key, completion in pool.completions(requests):
    ...         print(key, completion.text)
    """

    def __init__(self, config: PoolConfig, **engine_options: Any) -> None:
        self.workers: list[Worker] = []
        self.dead: list[WorkerInfo] = []  # workers lost mid-run, their requests given away
        self.cluster = Cluster(config)
        try:
            self._start(config, engine_options)
        except BaseException:
            self.close()
            raise

    def _start(self, config: PoolConfig, engine_options: dict[str, Any]) -> None:
        ray = self.cluster.ray
        actor, options = self.cluster.worker_options(config.workers, engine_options)
        remote = ray.remote(EngineWorker).options(**actor)
        self.workers = [Worker(remote.remote(options)) for _ in range(config.workers)]
        try:
            infos = ray.get([w.actor.ready.remote() for w in self.workers])
        except ray.exceptions.RayActorError as e:  # died loading (killed, out of memory)
            raise VengineError(f"a worker died while starting: {one_line(e)[:300]}") from None
        for w, info in zip(self.workers, infos):
            if isinstance(info, VengineError):
                raise info
            w.info = info
        self.slots = infos[0].max_batch  # requests a worker holds: its batch, no queue

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for w in self.workers:
            self.cluster.ray.kill(w.actor)
        self.workers = []
        self.cluster.close()

    def prompt_ids(self, prompt: Prompt | list[dict[str, str]]) -> list[int]:
        """A prompt's checked token ids (LLM.prompt_ids, on the first live worker)."""
        while True:
            w = self.workers[0]
            try:
                ids = self.cluster.ray.get(w.actor.prompt_ids.remote(prompt))
            except self.cluster.ray.exceptions.RayActorError as e:
                self._drop(w, deque(), e)
                continue
            if isinstance(ids, VengineError):
                raise ids
            return ids

    def peak_memory(self) -> list[dict[str, int]]:
        """Each live worker's peak GPU allocation and resident set, in bytes."""
        return self.cluster.ray.get([w.actor.peak_memory.remote() for w in self.workers])

    def completions(self, requests: Iterable[Request]) -> Iterator[tuple[Any, Completion]]:
        """Yield (key, Completion) for (key, prompt, params) requests in the order they finish,
        as LLM.completions does; requests are read only as workers have free slots."""
        ray, exceptions = self.cluster.ray, self.cluster.ray.exceptions
        incoming = zip(itertools.count(), iter(requests))  # (ticket, request): tickets are ours
        returned: deque[tuple[int, Request]] = deque()  # held by a worker that died
        in_flight: dict[Any, Worker] = {}

        def feed(w: Worker) -> None:
            new = []
            while len(w.held) < self.slots:
                nxt = returned.popleft() if returned else next(incoming, None)
                if nxt is None:
                    break
                ticket, request = nxt
                w.held[ticket] = request
                new.append((ticket, *request[1:]))
            if w.held:
                w.call = w.actor.advance.remote(new)
                in_flight[w.call] = w

        try:
            for w in self.workers:
                feed(w)
            while in_flight:
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                w = in_flight.pop(ref)
                w.call = None
                try:
                    finished = ray.get(ref)
                except exceptions.RayActorError as e:  # the worker died: the others take over
                    self._drop(w, returned, e)
                    for idle in [v for v in self.workers if v.call is None]:
                        feed(idle)
                    continue
                except exceptions.RayTaskError as e:  # its own error: the run ends with it
                    raise e.cause if isinstance(e.cause, VengineError) else e from None
                done = [(w.held.pop(ticket)[0], completion) for ticket, completion in finished]
                feed(w)  # before the caller writes: the worker goes on meanwhile
                yield from done
        finally:  # an abandoned stream: workers drop what they hold once their call returns
            for w in self.workers:
                if w.held:
                    w.actor.abort_all.remote()
                w.held, w.call = {}, None

    def _drop(self, w: Worker, returned: deque, error: Exception) -> None:
        self.workers.remove(w)
        self.dead.append(w.info)
        self.cluster.ray.kill(w.actor)
        returned.extendleft(sorted(w.held.items(), reverse=True))  # first in, first again
        if not self.workers:
            raise VengineError(f"every worker died, the last with {type(error).__name__}; the "
                               "rows written are kept: run again to finish the rest") from None


def generate_pool(requests: Iterable[Request], workers: int = 1,
                  ray_address: str | None = None, **engine_options: Any
                  ) -> Iterator[tuple[Any, Completion]]:
    """Yield (key, Completion) for (key, prompt, params) requests as they finish, from `workers`
    engines on Ray (started here, stopped when the iterator ends or is closed)."""
    with EnginePool(PoolConfig(workers, ray_address), **engine_options) as pool:
        yield from pool.completions(requests)
