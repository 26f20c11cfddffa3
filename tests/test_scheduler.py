"""The scheduler and the engine loop on CPU with a fake runner: admission by free pages,
preemption of the newest request, abort, events, and pages given back in every case."""

from __future__ import annotations

import pytest
import torch

from vengine.engine.core import EngineCore
from vengine.engine.sampling import SamplingParams
from vengine.engine.scheduler import Scheduler
from vengine.engine.sequence import Sequence
from vengine.offload.kv_pool import PageAllocator

VOCAB, EOS, PAGE = 8, 7, 4


class FakeRunner:
    """Caches tokens by taking pages from the allocator, as ModelRunner does, and predicts
    token (last + 1) % EOS, so every request's output is known in advance."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator, self.calls, self.released = allocator, [], []

    def _logits(self, seq: Sequence) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor((seq.all_ids[-1] + 1) % EOS),
                                           VOCAB).float()

    def prefill(self, seq: Sequence) -> torch.Tensor:
        self.allocator.grow(seq.block_table, seq.num_tokens)
        seq.num_cached = seq.num_tokens
        self.calls.append(("prefill", seq.seq_id))
        return self._logits(seq)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        for s in seqs:
            self.allocator.grow(s.block_table, s.num_tokens)
            s.num_cached += 1
        self.calls.append(("decode", tuple(s.seq_id for s in seqs)))
        return torch.stack([self._logits(s) for s in seqs])

    def release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.num_cached = 0
        self.released.append(seq.seq_id)


class _Decoder:
    def push(self, token: int) -> str:
        return str(token)

    def flush(self) -> str:
        return ""


def request(seq_id: int, prompt: list[int], max_new_tokens: int) -> Sequence:
    seq = Sequence(seq_id, prompt, SamplingParams(max_new_tokens=max_new_tokens))
    seq.decoder = _Decoder()
    return seq


def engine(pages: int, max_batch: int = 4) -> tuple[EngineCore, FakeRunner]:
    alloc = PageAllocator(pages, PAGE, pages)
    runner = FakeRunner(alloc)
    return EngineCore(runner, alloc, {EOS}, max_batch, 64, lambda seq_id: {}), runner


def drain(core: EngineCore) -> list:
    events = []
    while core.has_work():
        events += core.step()
    return events


def test_every_request_completes_with_its_tokens_and_pages_come_back():
    core, runner = engine(pages=32, max_batch=2)
    seqs = [request(i, [i % EOS], 5) for i in range(5)]
    for s in seqs:
        core.add(s)
    events = drain(core)
    for s in seqs:
        start = s.prompt_ids[0]
        assert s.output_ids == [(start + j + 1) % EOS for j in range(len(s.output_ids))]
        assert s.finish_reason == ("stop" if EOS in s.all_ids[1:] else "length")
    assert runner.allocator.num_free == 32 and sorted(runner.released) == list(range(5))
    finished = [e.seq.seq_id for e in events if e.finished]
    assert sorted(finished) == list(range(5)) and len(finished) == 5
    # at most max_batch decode together, and a waiting request starts as soon as one finishes
    assert all(len(ids) <= 2 for kind, ids in runner.calls if kind == "decode")
    assert runner.calls[:2] == [("prefill", 0), ("prefill", 1)]


def test_admission_waits_for_free_pages():
    # 6 pages: request 0 takes 3 (9 tokens + 1); request 1 needs 3 + 1 of headroom: must wait
    core, runner = engine(pages=6)
    a, b = request(0, [1] * 9, 2), request(1, [2] * 9, 2)
    core.add(a)
    core.add(b)
    drain(core)
    prefills = [i for i, (kind, _) in enumerate(runner.calls) if kind == "prefill"]
    assert runner.calls[prefills[1] - 1] == ("decode", (0,)), "b ran before a finished"
    assert a.finish_reason == b.finish_reason == "length"
    assert runner.allocator.num_free == 6


def test_the_newest_request_is_preempted_and_recomputed():
    # 5 pages: three 3-token prompts (1 page each + headroom) fit; their growth does not
    core, runner = engine(pages=5)
    seqs = [request(i, [i + 1] * 3, 6) for i in range(3)]
    for s in seqs:
        core.add(s)
    drain(core)
    prefilled = [ids for kind, ids in runner.calls if kind == "prefill"]
    assert prefilled.count(2) == 2, f"request 2 was not preempted and re-admitted: {runner.calls}"
    for s in seqs:  # recomputation changes nothing of what was generated
        assert s.output_ids[:6] == [(s.prompt_ids[0] + j + 1) % EOS for j in range(6)][
            : len(s.output_ids)]
    assert runner.allocator.num_free == 5


def test_abort_frees_pages_at_once_wherever_the_request_is():
    core, runner = engine(pages=16, max_batch=1)
    running, waiting = request(0, [1, 2], 50), request(1, [3], 50)
    core.add(running)
    core.add(waiting)
    core.step()  # prefill of 0; 1 waits for the only slot
    assert core.scheduler.running == [running] and list(core.scheduler.waiting) == [waiting]
    core.abort(running)
    assert running.finish_reason == "abort" and not running.block_table
    assert runner.allocator.num_free == 16
    core.abort(waiting)
    assert not core.has_work() and waiting.finish_reason == "abort"


def test_a_kept_cache_survives_its_finish_and_abort_unfinished_spares_it():
    core, runner = engine(pages=16)
    chat, other = request(0, [1, 2], 2), request(1, [3], 50)
    chat.keep_cache = True
    core.add(chat)
    core.add(other)
    while chat.finish_reason is None:
        core.step()
    core.abort_unfinished()
    assert chat.block_table and chat.finish_reason == "length"
    assert other.finish_reason == "abort" and not other.block_table


def test_a_failed_prefill_frees_its_pages():
    """A prefill that raises after taking pages (an out-of-memory, a bad kernel) gives them back:
    its request is neither waiting nor running any more, where abort_unfinished looks."""
    core, runner = engine(pages=16)
    running, failing = request(0, [1, 2], 50), request(1, [3] * 9, 5)
    core.add(running)
    core.step()  # running's prefill
    free = runner.allocator.num_free

    def prefill(seq):
        runner.allocator.grow(seq.block_table, seq.num_tokens)
        raise RuntimeError("out of memory")

    runner.prefill = prefill
    core.add(failing)
    with pytest.raises(RuntimeError):
        core.step()
    assert failing.finish_reason == "abort" and not failing.block_table
    assert runner.allocator.num_free == free
    core.abort_unfinished()
    assert running.finish_reason == "abort" and runner.allocator.num_free == 16


def test_scheduler_alone_admits_in_order_and_keeps_headroom():
    alloc = PageAllocator(4, PAGE, 4)
    sched = Scheduler(alloc, max_batch=4, release=lambda s: alloc.free(s.block_table))
    a, b = request(0, [1] * 4, 1), request(1, [1] * 4, 1)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a]
    alloc.grow(a.block_table, 5)  # a's prefill: 2 pages
    sched.finish_step(batch)
    batch = sched.schedule()  # b needs 2 + 1 headroom, 2 are free: decode a instead
    assert not batch.is_prefill and batch.seqs == [a]


def test_padding_rows_of_the_embedding_are_never_sampled():
    """Logits past the tokenizer's vocabulary (an embedding's padding rows) are cut before
    sampling: here the fake model prefers id VOCAB - 1, which the tokenizer does not have."""
    alloc = PageAllocator(8, PAGE, 8)
    runner = FakeRunner(alloc)
    runner._logits = lambda seq: torch.arange(VOCAB).float()  # argmax: VOCAB - 1
    core = EngineCore(runner, alloc, {EOS}, 4, 64, lambda seq_id: {}, vocab_size=VOCAB - 1)
    seq = request(0, [1], 3)
    core.add(seq)
    drain(core)
    assert seq.output_ids[0] == VOCAB - 2 and max(seq.output_ids) < VOCAB - 1
