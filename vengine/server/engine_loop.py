"""One thread owns the LLM and drives its EngineCore for as long as the server runs.

The engine is not thread-safe, so nothing else touches it: HTTP handlers post `add` and `abort`
commands, applied between steps (a new request joins the running batch at the next step), and
each step's events go back to the asyncio loop in one call. A finished request keeps its KV as a
cached conversation (a few, least recently used first out, and only while the pool has pages to
spare); a later request that extends its whole prompt continues it, prefilling only the rest,
as `ChatSession` does.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from vengine.engine.sampling import SamplingParams
from vengine.engine.sequence import Sequence


class ShuttingDown(Exception):
    """What a request still running when the server's shutdown timeout ends gets."""


@dataclass(frozen=True)
class Final:
    """A finished request, copied on the engine thread (its Sequence may be reused next turn)."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV an earlier request left (not prefilled)
    stats: dict[str, Any]


@dataclass(eq=False)
class Handle:
    """One request as a handler sees it: (text, Final | None) pairs, or an Exception, arrive on
    `events` in the asyncio loop."""

    ids: list[int]
    params: SamplingParams
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False  # the handler got its Final (or an error): nothing left to abort
    seq: Sequence | None = None  # set on the engine thread, with cached:
    cached: int = 0  # prompt tokens already in the KV (a conversation's earlier turns)


class EngineLoop:
    def __init__(self, llm: Any, cache_size: int | None = None) -> None:
        self.llm = llm
        self.core = llm.engine_core()
        self.cache_size = llm.config.max_batch if cache_size is None else cache_size
        self.cache: OrderedDict[int, Sequence] = OrderedDict()  # seq_id -> finished, with KV
        self.live: dict[int, Sequence] = {}  # added, not finished nor aborted (prefilling too)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- called from the asyncio thread -------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="vengine-engine", daemon=True)
        self._thread.start()

    def submit(self, handle: Handle) -> None:
        self._commands.put(("add", handle))

    def abort(self, handle: Handle) -> None:
        """Stop the request and free its pages (its client left); a no-op once finished."""
        if not handle.done:
            self._commands.put(("abort", handle))

    def cancel_after(self, seconds: float) -> None:
        """Cancel whatever still runs in `seconds` (a SIGTERM's grace period; thread-safe)."""
        timer = threading.Timer(seconds, self._commands.put, [("cancel", None)])
        timer.daemon = True
        timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what still runs, free every page and end the thread."""
        if self._thread is not None:
            self._commands.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def occupancy(self) -> dict[str, int]:
        """Pages in use and requests by state (read without a lock: counts, not a snapshot)."""
        s = self.core.scheduler
        total = self.llm.memory.num_pages
        return {"pages_total": total, "pages_used": total - s.allocator.num_free,
                "active": len(self.live), "running": len(s.running), "waiting": len(s.waiting),
                "cached_conversations": len(self.cache)}

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._apply(block=not self.core.has_work()):
                self._evict_while_short()
                try:
                    events = self.core.step()
                except Exception as e:  # noqa: BLE001  (tell every client, keep serving)
                    traceback.print_exc(file=sys.stderr)
                    self._fail(e)
                    continue
                if events:
                    self._deliver([(ev.seq.key, ev.text, self._finish(ev.seq)
                                    if ev.finished else None) for ev in events])
        finally:
            self.core.abort_unfinished()
            for seq in self.cache.values():
                self.llm.release(seq)
            self.cache.clear()

    def _apply(self, block: bool) -> bool:
        """Apply the pending commands (waiting for one when idle); False on stop."""
        while True:
            try:
                command, handle = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command == "stop":
                return False
            if command == "add":
                try:
                    self._add(handle)
                except Exception as e:  # noqa: BLE001  (this request fails, the loop goes on)
                    traceback.print_exc(file=sys.stderr)
                    self._deliver([(handle, e, None)])
            elif command == "cancel":
                self._fail(ShuttingDown("the server is shutting down"))
            elif handle.seq is not None and handle.seq.finish_reason is None:
                self.core.abort(handle.seq)
                self.live.pop(handle.seq.seq_id, None)

    def _add(self, handle: Handle) -> None:
        seq = self._conversation(handle.ids)
        if seq is None:
            seq = self.llm.new_request(handle.ids, handle.params)
            seq.keep_cache = True  # finished, it may become a cached conversation
        else:
            self.llm.continue_request(seq, handle.ids, handle.params)
        seq.key, handle.seq, handle.cached = handle, seq, seq.num_cached
        self.live[seq.seq_id] = seq
        self.core.add(seq)

    def _conversation(self, ids: list[int]) -> Sequence | None:
        """Take the cached conversation whose whole prompt ids begin (the longest): the next
        turn of a chat. A prompt that only shares a prefix (a system prompt) starts afresh, so
        that it does not cut another conversation's cache short."""
        best = None
        for seq in self.cache.values():
            n = len(seq.prompt_ids)
            if len(ids) > n and ids[:n] == seq.prompt_ids and (
                    best is None or n > len(best.prompt_ids)):
                best = seq
        if best is not None:
            del self.cache[best.seq_id]
        return best

    def _finish(self, seq: Sequence) -> Final:
        final = Final(seq.text, seq.finish_reason or "length", len(seq.prompt_ids),
                      len(seq.output_ids), seq.key.cached, dict(seq.stats))
        self.live.pop(seq.seq_id, None)
        self.cache[seq.seq_id] = seq
        while len(self.cache) > self.cache_size:
            self.llm.release(self.cache.popitem(last=False)[1])
        return final

    def _evict_while_short(self) -> None:
        """Free cached conversations, oldest first, while the next step lacks pages: the
        running requests' next tokens, or the first waiting one's prompt with a page of
        headroom per running request (the scheduler's own tests), so that a cache never makes
        the scheduler preempt or hold back a live request."""
        s, alloc = self.core.scheduler, self.core.scheduler.allocator
        while self.cache:
            need = sum(alloc.pages_for(r.num_cached + 1) > len(r.block_table) for r in s.running)
            if s.waiting and s.has_slot:
                w = s.waiting[0]
                admit = alloc.pages_for(w.num_tokens + 1) - len(w.block_table) + len(s.running)
                need = max(need, admit)
            if alloc.num_free >= need:
                return
            self.llm.release(self.cache.popitem(last=False)[1])

    def _fail(self, error: Exception) -> None:
        s = self.core.scheduler
        hit = [seq.key for seq in self.live.values()]
        for seq in [*s.running, *s.waiting, *self.live.values()]:
            if seq.finish_reason is None:
                self.core.abort(seq)
        self.live.clear()
        self._deliver([(h, error, None) for h in hit])

    def _deliver(self, items: list[tuple[Handle, Any, Final | None]]) -> None:
        self._loop.call_soon_threadsafe(_dispatch, items)


def _dispatch(items: list[tuple[Handle, Any, Final | None]]) -> None:
    """In the asyncio loop: each handler's queue gets its piece."""
    for handle, text, final in items:
        handle.events.put_nowait(text if isinstance(text, Exception) else (text, final))
