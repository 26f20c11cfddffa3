"""The OpenAI request and response shapes: a JSON body -> a checked Request, results -> dicts.

Checked by hand rather than by pydantic models: every bad field is a 400 naming the field in
OpenAI's error shape (pydantic's would be 422 and coerce "0.5" into 0.5), and the sampling
ranges stay SamplingParams' own. No web framework here: the parsing is tested without one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from vengine.attention.config import VAttention
from vengine.engine.sampling import SamplingParams
from vengine.errors import ConfigError

# SamplingParams field -> the request field that set it
FIELDS = {"max_new_tokens": "max_tokens"}
# accepted only at their no-op value: the engine has no such feature
UNSUPPORTED = {
    "frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "top_logprobs": None,
    "tools": None, "tool_choice": None, "functions": None, "function_call": None,
    "logit_bias": None, "echo": False, "suffix": None, "best_of": 1,
}
ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error the client gets as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (status, message, param,
                                                                        kind, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Request:
    """A checked /v1/chat/completions or /v1/completions body."""

    chat: bool
    messages: list[dict[str, str]] | None  # chat
    prompt: str | list[int] | None  # completions: text or token ids
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def parse_request(body: Any, chat: bool, model_id: str, defaults: dict[str, Any],
                  attention: Any) -> Request:
    """Check body field by field; defaults: the server's sampling flags (SamplingParams kwargs)
    for what the body leaves out; attention: the served spec (per-request epsilon/delta need
    vAttention)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    model = _field(body, "model", str)
    if model is not None and model != model_id:
        raise APIError(404, f"the model '{model}' does not exist; this server serves "
                       f"'{model_id}' (GET /v1/models)", "model", code="model_not_found")
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if value not in (None, False, neutral, [], {}, "none"):
            raise APIError(400, f"{name} is not supported by vengine"
                           + (" (repetition_penalty is, as an extra field)"
                              if name.endswith("_penalty") else ""), name)
    if _field(body, "n", int, 1) != 1:
        raise APIError(400, "only n = 1 is supported", "n")
    fmt = _field(body, "response_format", dict)
    if fmt is not None and fmt.get("type") != "text":
        raise APIError(400, "response_format other than text is not supported",
                       "response_format")
    _check_attention(body, attention)

    messages = prompt = None
    if chat:
        messages = _messages(body.get("messages"))
    else:
        prompt = _prompt(body.get("prompt"))
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be a boolean",
                       "stream_options.include_usage")
    return Request(chat, messages, prompt, _sampling(body, defaults), stream, include_usage)


def _field(body: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    """body[name] if it is of kind (null: absent), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    number = kind in (float, (int, float))
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not ok:
        want = {str: "a string", bool: "a boolean", int: "an integer", dict: "an object",
                list: "an array"}.get(kind, "a number") if not number else "a number"
        raise APIError(400, f"{name} must be {want}, got {_shown(value)}", name)
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _sampling(body: dict, defaults: dict[str, Any]) -> SamplingParams:
    given = {
        "max_new_tokens": _field(body, "max_completion_tokens", int,
                                 _field(body, "max_tokens", int)),
        "temperature": _field(body, "temperature", (int, float)),
        "top_p": _field(body, "top_p", (int, float)),
        "top_k": _field(body, "top_k", int),
        "repetition_penalty": _field(body, "repetition_penalty", (int, float)),
        "seed": _field(body, "seed", int),
        "ignore_eos": _field(body, "ignore_eos", bool),
        "epsilon": _field(body, "epsilon", (int, float)),
        "delta": _field(body, "delta", (int, float)),
    }
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(
                isinstance(s, str) and s for s in stop):
            raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them",
                           "stop")
        given["stop"] = tuple(stop)
    if given["temperature"] is not None and not 0 <= given["temperature"] <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {given['temperature']}",
                       "temperature")
    try:
        return SamplingParams(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
    except ConfigError as e:  # the engine's own ranges, under the request's field names
        field = getattr(e, "field", None) or ""
        name = FIELDS.get(field, field)
        raise APIError(400, str(e).replace(field, name, 1) if field else str(e),
                       name or None) from None


def _check_attention(body: dict, attention: Any) -> None:
    for name in ("epsilon", "delta"):
        if body.get(name) is not None and not isinstance(attention, VAttention):
            raise APIError(400, f"{name}: this server runs exact attention (--attention full); "
                           f"{name} applies only to vattention", name)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"{where} must be an object with a role in {', '.join(ROLES)}",
                           f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported",
                               f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or text parts, got "
                           f"{_shown(content)}", f"{where}.content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str) for p in value):
        raise APIError(400, "one prompt per request is supported", "prompt")
    raise APIError(400, "prompt must be a non-empty string or array of token ids, got "
                   f"{_shown(value)}", "prompt")


def check_prompt(ids: list[int], max_context: int, vocab: int, param: str) -> None:
    """The prompt must leave room for one token in the context, and its ids must decode."""
    if len(ids) >= max_context:
        raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds "
                       f"{max_context} (and needs room for one more): shorten it, or restart "
                       "the server with a larger --ctx", param, code="context_length_exceeded")
    if min(ids) < 0 or max(ids) >= vocab:
        raise APIError(400, f"token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}",
                       param)


# -- responses -------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(final: Any) -> dict[str, Any]:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": final.cached_tokens}}


def extras(final: Any, attention: Any, params: SamplingParams) -> dict[str, Any]:
    """vengine's own fields: what the attention did for this request (under its own epsilon and
    delta, or the served ones) and how fast it went."""
    s = final.stats
    out: dict[str, Any] = {"attention": "vattention" if isinstance(attention, VAttention)
                           else "full", "cached_tokens": final.cached_tokens,
                           "prefilled_tokens": final.prompt_tokens - final.cached_tokens}
    if isinstance(attention, VAttention):
        out |= {"epsilon": params.epsilon or attention.epsilon,
                "delta": params.delta or attention.delta, "guarantee": attention.guarantee}
    for key in ("density", "certificate_violation_rate", "predictor_miss_rate", "sparse_steps",
                "time_to_first_token_s", "decode_tokens_per_s", "seconds"):
        if key in s:
            out[key] = s[key]
    return out


def response(rid: str, chat: bool, model_id: str, final: Any, attention: Any,
             params: SamplingParams) -> dict[str, Any]:
    """The non-streamed body."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": final.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": final.text}
    else:
        choice["text"] = final.text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice],
            "usage": usage(final), "vengine": extras(final, attention, params)}


def chunk(rid: str, chat: bool, model_id: str, text: str | None = None,
          finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    """One streamed piece: a text delta, or the finish reason (with an empty delta)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice]}
