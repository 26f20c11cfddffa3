"""Tokenizer: the one interface the engine uses, whatever format the model's vocabulary came in.

The engine needs the same five things from every model -- encode, decode, streaming decode, stop
ids and the chat prompt; `sources` turns each format into a backend, special tokens and templates.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vengine.errors import ConfigError
from vengine.models.tokenizer.backends import Backend
from vengine.models.tokenizer.chat_template import ChatTemplates
from vengine.models.tokenizer.sources import read_gguf, read_hf_dir

_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    """Encode/decode, special ids and chat prompts for one model, whatever format it came in."""

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: dict[str, str | None],
        chat_templates: dict[str, str],
        extra_stop_ids: set[int],
        source: str,
    ) -> None:
        self._backend = backend
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.vocab_size: int = backend.size()  # including added tokens: every id decode accepts
        self.bos_id: int | None = self._lookup(self.special_tokens.get("bos_token"))
        self.eos_id: int | None = self._lookup(self.special_tokens.get("eos_token"))
        self.special_ids: frozenset[int] = backend.special_ids
        self.chat_templates = dict(chat_templates)
        self._chat = ChatTemplates(self.chat_templates, source)
        stops = {i for i in extra_stop_ids if 0 <= i < self.vocab_size}
        if self.eos_id is not None:
            stops.add(self.eos_id)
        turn_end = self._turn_end_id()
        if turn_end is not None:
            stops.add(turn_end)
        self.stop_ids: frozenset[int] = frozenset(stops)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """An HF model directory: tokenizer.json (preferred) or tokenizer.model, plus the
        tokenizer_config, special_tokens_map, generation_config, chat_template.jinja beside it."""
        backend, specials, templates, stops = read_hf_dir(Path(path))
        return cls(backend, special_tokens=specials, chat_templates=templates,
                   extra_stop_ids=stops, source=str(path))

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], source: str = "GGUF file") -> Tokenizer:
        """From GGUF metadata (`gguf_metadata(reader)`): 'gpt2' byte-level BPE or 'llama'
        sentencepiece-style BPE, special tokens and chat template(s) included."""
        backend, specials, templates, stops = read_gguf(meta, source)
        return cls(backend, special_tokens=specials, chat_templates=templates,
                   extra_stop_ids=stops, source=source)

    # -- tokens ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; BOS/EOS only where the model's config asks for them (as transformers).

        Lone surrogates (text read with errors='surrogateescape' from invalid UTF-8) become
        U+FFFD, as a UTF-8 decoder with errors='replace' would have written them.
        """
        if not isinstance(text, str):
            raise ConfigError(f"encode: expected a str, got {type(text).__name__}")
        return self._backend.encode(_SURROGATE.sub("\ufffd", text), add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        try:
            checked = [self._check_id(i) for i in ids]
        except TypeError:  # not iterable
            kind = type(ids).__name__
            raise ConfigError(f"decode: expected a list of token ids, got {kind}") from None
        return self._backend.decode(checked, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(self._check_id(token_id))
        if token is None:  # a hole in a tokenizer.json vocabulary
            raise ConfigError(f"token id {token_id} is not in the vocabulary")
        return token

    def _check_id(self, token_id: object) -> int:
        """An id the backends take: `tokenizers` raises OverflowError on a negative one and
        silently drops one past the end."""
        try:
            i = operator.index(token_id)  # ints, numpy ints
        except TypeError:
            raise ConfigError(f"token ids must be ints, got {token_id!r}") from None
        if not 0 <= i < self.vocab_size:
            raise ConfigError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return i

    def _lookup(self, token: str | None) -> int | None:
        return self._backend.token_to_id(token) if token else None

    # -- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for `messages`, rendered like transformers' apply_chat_template(
        tokenize=False): variables messages, tools, documents, add_generation_prompt, the special
        token strings (bos_token, eos_token, ...) and any kwargs. With `tools` and a 'tool_use'
        template, that one is used. A model without any template gets plain ChatML."""
        return self._chat.render(messages, add_generation_prompt, {**self.special_tokens, **kwargs})

    def _turn_end_id(self) -> int | None:
        """The special token a chat template writes right after an assistant reply (<|im_end|>,
        <|eot_id|>, <|end|>, <end_of_turn>...), found by rendering a probe conversation."""
        if not self.chat_templates:
            return None
        marker = "vengine-probe-reply"
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text = self.apply_chat_template(probe, add_generation_prompt=False)
        except Exception:
            return None
        rest = text[text.rfind(marker) + len(marker) :].lstrip() if marker in text else ""
        ids = self._backend.encode(rest, False) if rest else []
        return ids[0] if ids and ids[0] in self.special_ids else None
