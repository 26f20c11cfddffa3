"""A multi-turn conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the chat template, keeps the cached tokens that
still match (the longest common prefix) and prefills only the rest: usually just the new user
message, plus the reply's last tokens where re-tokenising the reply differs from what was sampled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vengine.engine.llm import LLM
from vengine.engine.sampling import SamplingParams
from vengine.engine.sequence import Completion, Sequence
from vengine.errors import ContextLengthError


class ChatSession:
    def __init__(self, llm: LLM, system: str | None = None) -> None:
        self.llm, self.system = llm, system
        self.messages: list[dict[str, str]] = []
        self.seq: Sequence | None = None
        self.last: Completion | None = None
        self.prefilled_tokens = 0  # tokens the last turn had to prefill

    def _history(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def send(self, text: str, **sampling: Any) -> Iterator[str]:
        """Stream the reply to one user message."""
        params = SamplingParams(**sampling)
        messages = self._history() + [{"role": "user", "content": text}]
        ids = self.llm.chat_ids(messages)
        limit = self.llm.config.max_context
        if len(ids) >= limit:
            raise ContextLengthError(
                f"the conversation has {len(ids)} tokens and the context holds {limit}: "
                "/reset it, or restart with a larger --ctx"
            )
        if self.seq is None:
            self.seq = self.llm.new_request(ids, params)
            self.seq.keep_cache = True
        else:
            self.llm.continue_request(self.seq, ids, params)
        seq = self.seq
        self.prefilled_tokens = len(ids) - seq.num_cached
        for event in self.llm.run([seq]):
            if event.text:
                yield event.text
        self.last = self.llm.completion(seq)
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": seq.text}]

    def reset(self) -> None:
        """Forget the conversation and free its pages."""
        if self.seq is not None:
            self.llm.release(self.seq)
        self.seq, self.last, self.messages = None, None, []

    def context_tokens(self) -> int:
        return self.seq.num_cached if self.seq is not None else 0
