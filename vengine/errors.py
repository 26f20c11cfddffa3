"""Typed errors: the CLI turns any VengineError into one line on stderr and exit code 2."""

from __future__ import annotations


class VengineError(Exception):
    """Base class for every error vengine raises on bad input."""


class ModelLoadError(VengineError):
    """A model path, file or format that cannot be loaded."""


class ConfigError(VengineError, ValueError):
    """An argument or flag with an invalid value.

    `field` names the config field the message is about ("max_context", "VAttention.epsilon"),
    so the CLI can name its own flag instead; `str(e)` stays the complete one-line message.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthError(VengineError):
    """A prompt or conversation that does not fit the context."""


class HostMemoryError(VengineError, MemoryError):
    """The host KV pool's byte budget is exhausted."""


def one_line(e: BaseException) -> str:
    """A third-party exception's text on one line, to quote inside a VengineError's message."""
    return " ".join(str(e).split()) or type(e).__name__
