"""Render a chat template (Jinja) the way transformers' `apply_chat_template` does.

Same environment: sandboxed and immutable, `trim_blocks` and `lstrip_blocks`, loop controls,
a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`, and `{% generation %}`
blocks (rendered as their plain content).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvlm.tokenizer.errors import TokenizerError


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
    only rendering, the block is its content."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template plus the special-token variables it may read.

    `render` drops message keys whose value is None (as transformers does) and turns template
    errors, including `raise_exception(...)` calls, into TokenizerError.
    """

    def __init__(self, source: str, template_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
            # Whether the template renders `tools` itself (else the server writes a prompt).
            self.reads_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template does not compile: {e} (line {e.lineno})") from e
        self.source = source
        self.template_tokens = dict(template_tokens)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if not messages:
            raise TokenizerError("cannot apply a chat template to an empty list of messages")
        for message in messages:
            if not isinstance(message, dict):
                raise TokenizerError(f"chat messages must be dicts, got {message!r}")
        cleaned = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                messages=cleaned,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=None,
                **self.template_tokens,
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e
