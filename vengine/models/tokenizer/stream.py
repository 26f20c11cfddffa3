"""Streaming decode: text of a growing id list, emitted once it can no longer change."""

from __future__ import annotations

from vengine.models.tokenizer.core import Tokenizer

_STREAM_MAX_PENDING = 8  # tokens held back for an unfinished UTF-8 character before giving up


class StreamDecoder:
    """Text of a growing id list, one token at a time, emitting only final text.

    Each push decodes a small window (the tokens of the last emission plus the pending ones) and
    emits what it adds beyond the window's prefix, so the cost per token is O(window), not
    O(sequence); a window ending in U+FFFD is an unfinished UTF-8 character and is held back
    (up to a few tokens, after which the replacement character is emitted as is).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window: tokens of the last emission, then pending ones
        self._read = 0  # how many of them were emitted

    def push(self, token_id: int) -> str:
        """The new final text after `token_id` (often '', e.g. mid-character)."""
        if self._skip and token_id in self._tok.special_ids:
            return ""  # decode() drops these before the decoder runs; so do we
        if not 0 <= token_id < self._tok.vocab_size:
            return ""  # a padded embedding row past the tokenizer's vocabulary: no text
        self._ids.append(token_id)
        done = self._tok.decode(self._ids[: self._read], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        if len(self._ids) - self._read < _STREAM_MAX_PENDING and (
            len(text) <= len(done) or text.endswith("\ufffd")
        ):
            return ""
        del self._ids[: self._read]  # the next window starts at the tokens emitted now
        self._read = len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes to U+FFFD)."""
        done = self._tok.decode(self._ids[: self._read], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        self._ids, self._read = [], 0
        return text[len(done) :]
