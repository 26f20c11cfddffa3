"""Chat templates: Jinja rendered the way transformers' apply_chat_template(tokenize=False) does,
so a model's own template gives the same prompt text here as there."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from vengine.errors import ConfigError, ModelLoadError, one_line

# Used when a model has no chat template at all: plain ChatML, documented in apply_chat_template.
_FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _jinja_env():
    """transformers' chat-template environment: sandboxed, trim/lstrip blocks, JSON without HTML
    escaping, `raise_exception`, `strftime_now`, loop controls, a pass-through `generation` tag."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}` only marks assistant text for training masks; render its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplates:
    """A model's named templates, compiled once; with none, plain ChatML (_FALLBACK_TEMPLATE)."""

    def __init__(self, templates: dict[str, str], source: str) -> None:
        self.source = source
        self._env = _jinja_env()
        self._compiled: dict[str, Any] = {}
        self._fallback: Any = None
        for name, text in templates.items():
            try:
                self._compiled[name] = self._env.from_string(text)
            except Exception as e:
                raise ModelLoadError(
                    f"{source}: chat template {name!r} does not parse ({one_line(e)})"
                ) from None

    def render(
        self, messages: list[dict], add_generation_prompt: bool, variables: dict[str, Any]
    ) -> str:
        """The prompt text; with `tools` and a 'tool_use' template, that one is used."""
        if not messages:
            raise ConfigError("cannot apply a chat template to an empty conversation")
        template = self._select(variables.get("tools") is not None)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **variables}
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except Exception as e:  # raise_exception, undefined names, type errors in the template
            raise ConfigError(f"chat template failed on these messages: {one_line(e)}") from None

    def _select(self, with_tools: bool):
        if not self._compiled:
            if self._fallback is None:
                self._fallback = self._env.from_string(_FALLBACK_TEMPLATE)
            return self._fallback
        if with_tools and "tool_use" in self._compiled:
            return self._compiled["tool_use"]
        if "default" in self._compiled:
            return self._compiled["default"]
        if len(self._compiled) == 1:
            return next(iter(self._compiled.values()))
        raise ConfigError(
            f"{self.source}: several chat templates and none named 'default': "
            f"{', '.join(sorted(self._compiled))}"
        )
