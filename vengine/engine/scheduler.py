"""Which requests run each step: waiting and running queues, admission by free pages, preemption.

Pure bookkeeping over the page allocator (nano-vllm's Scheduler and BlockManager split the same
way): the scheduler never runs the model. Each step is either the prefill of one waiting request
or a decode of every running one. A request is admitted when its prompt's pages fit with one page
of headroom per running request; when a decode step's new pages do not fit, the newest running
request is preempted (its pages freed, its tokens recomputed when it is admitted again), as vLLM
does. Pages are given back in one place, `release`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vengine.engine.sequence import Sequence
from vengine.offload.kv_pool import PageAllocator


@dataclass(frozen=True)
class Batch:
    seqs: list[Sequence]
    is_prefill: bool  # one sequence's prompt (not yet cached part), else one token for each


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_batch: int,
                 release: Callable[[Sequence], None]) -> None:
        self.allocator, self.max_batch = allocator, max_batch
        self._release = release  # frees a sequence's pages and backend state
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_slot(self) -> bool:
        """Room for one more running request (callers pull new requests only then)."""
        return len(self.running) < self.max_batch

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        """The next step: admit the first waiting request if it fits, else decode the running
        ones (preempting the newest while their new pages do not fit); None when idle."""
        if self.waiting and self.has_slot and (not self.running or self._fits(self.waiting[0])):
            return Batch([self.waiting.popleft()], is_prefill=True)
        if not self.running:
            return None
        self._make_room()
        return Batch(list(self.running), is_prefill=False)

    def finish_step(self, batch: Batch) -> None:
        """After a step: a prefilled request joins the running ones, finished ones leave them
        (their pages are released unless the request keeps its cache, e.g. a chat session)."""
        for seq in batch.seqs:
            if seq.finish_reason is not None and not seq.keep_cache:
                self.release(seq)
        if batch.is_prefill:
            self.running += [s for s in batch.seqs if s.finish_reason is None]
        else:
            self.running = [s for s in self.running if s.finish_reason is None]

    def abort(self, seq: Sequence) -> None:
        """Stop a request wherever it is and free its pages at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.finish_reason is None:
            seq.finish_reason = "abort"
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        if seq.block_table:
            self._release(seq)

    def _fits(self, seq: Sequence) -> bool:
        """Enough free pages for seq's prefill, keeping one page of headroom per running one."""
        need = self.allocator.pages_for(seq.num_tokens + 1) - len(seq.block_table)
        return self.allocator.num_free >= need + len(self.running)

    def _make_room(self) -> None:
        """Preempt the newest running requests until this decode step's new pages fit."""
        alloc = self.allocator
        while len(self.running) > 1:
            need = sum(alloc.pages_for(s.num_cached + 1) > len(s.block_table) for s in self.running)
            if alloc.num_free >= need:
                return
            victim = self.running.pop()
            self.release(victim)
            self.waiting.appendleft(victim)
