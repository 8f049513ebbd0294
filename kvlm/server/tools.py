"""Tools on /v1/chat/completions: what `tools`, `tool_choice` and `parallel_tool_calls` mean
for the prompt and for the grammar the output is held to.

Calls are written as Hermes-style tags (Qwen 2.5 / 3, Hermes, SmolLM3), one JSON object each:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`required` and a named function are enforced by a grammar that starts with the tag; `auto`
lets the model write text, and once it writes the tag (a lazy trigger in llguidance's Lark)
the rest must be calls; `none` sends no tools. A chat template that reads `tools` renders them
itself; for one that does not (SmolLM2's, and most small models'), `tool_prompt` writes a
system prompt that lists them and shows the format. Earlier calls and tool results in the
conversation are rendered the same way (`render_messages` in prompts.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kvlm.sampling.structured_grammar import JSON_OPTIONS
from kvlm.server.errors import APIError
from kvlm.server.protocol import ChatCompletionRequest

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
_NO_ARGUMENTS = {"type": "object", "properties": {}}
TOOL_PROMPT = """You can call these tools; each line gives one, with a JSON schema of its \
arguments:
<tools>
{tools}
</tools>
To call a tool, answer with its name and arguments in this form:
<tool_call>
{{"name": "<tool name>", "arguments": <the arguments as a JSON object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools: `choice` is "none", "auto", "required" or "function" (then
    `name` is the function's); `tools` are OpenAI's tool objects, as sent."""

    tools: tuple[dict[str, Any], ...]
    choice: str
    name: str | None = None
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def callable(self) -> tuple[dict[str, Any], ...]:
        """The tools the model may call under this choice."""
        if self.choice == "function":
            return tuple(t for t in self.tools if t["function"]["name"] == self.name)
        return self.tools

    def grammar(self) -> str | None:
        """The Lark grammar (llguidance's dialect) the output is held to; None for "none"."""
        if not self.parses_calls:
            return None
        schemas = [_call_schema(t["function"]) for t in self.callable]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        calls = 'call ("\\n<tool_call>" call)*' if self.parallel and self.name is None else "call"
        head = "TEXT | prefix " if self.choice == "auto" else '"<tool_call>" '
        rules = [
            "%llguidance {}",
            f"start: {head}{calls}",
            f'call: "\\n" %json {json.dumps({**schema, "x-guidance": JSON_OPTIONS})} '
            '"\\n</tool_call>"',
        ]
        if self.choice == "auto":  # free text, until it writes the tag
            rules += ["prefix[lazy]: /(.|\\n)*<tool_call>/", "TEXT: /(.|\\n)*/"]
        return "\n".join(rules)


def plan_tools(request: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tool plan (None without tools and tool_choice); 400 naming the field for
    a tool choice that names no tool, duplicate or malformed names, ..."""
    tools = request.tools or []
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if not _NAME.match(name):
            raise APIError(
                f"tools.{i}.function.name must be 1 to 64 letters, digits, '_' or '-', got "
                f"{name!r}",
                param=f"tools.{i}.function.name",
            )
        if name in names[:i]:
            raise APIError(
                f"tools.{i}.function.name: {name!r} is given twice; tool names must differ",
                param=f"tools.{i}.function.name",
            )
    choice, name = _choice(request.tool_choice, names)
    if not tools:
        if choice in ("none", None):
            return None
        raise APIError(f"tool_choice {choice!r} needs tools: send tools", param="tool_choice")
    dumped = tuple(t.model_dump(exclude_none=True) for t in tools)
    parallel = True if request.parallel_tool_calls is None else request.parallel_tool_calls
    return ToolPlan(dumped, choice or "auto", name, parallel)


def _choice(value: Any, names: list[str]) -> tuple[str | None, str | None]:
    if value is None or value in ("none", "auto", "required"):
        return value, None
    function = value.get("function") if isinstance(value, dict) else None
    if (
        not isinstance(value, dict)
        or set(value) != {"type", "function"}
        or value["type"] != "function"
        or not isinstance(function, dict)
        or set(function) != {"name"}
        or not isinstance(function["name"], str)
    ):
        shown = json.dumps(value)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        raise APIError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            f'"function": {{"name": ...}}}}, got {shown}',
            param="tool_choice",
        )
    name = function["name"]
    if name not in names:
        known = ", ".join(map(repr, names)) or "no tools"
        raise APIError(
            f"tool_choice names the function {name!r}, which is not among the tools ({known})",
            param="tool_choice",
        )
    return "function", name


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or _NO_ARGUMENTS,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_prompt(plan: ToolPlan) -> str:
    """The system prompt listing the callable tools, for templates that do not render them."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in plan.callable)
    prompt = TOOL_PROMPT.format(tools=lines)
    if plan.choice == "required":
        prompt += "\nAnswer with at least one tool call."
    elif plan.choice == "function":
        prompt += f"\nAnswer by calling {plan.name}."
    return prompt


def call_text(name: str, arguments: str) -> str:
    """An earlier call as the model writes one (arguments: OpenAI's JSON text)."""
    try:
        parsed: Any = json.loads(arguments)
    except json.JSONDecodeError:
        parsed = arguments  # shown as the client sent it
    body = json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def tool_result_text(content: str) -> str:
    """A tool's result, as a user turn (Qwen 2.5's convention for templates without tools)."""
    return f"<tool_response>\n{content}\n</tool_response>"
