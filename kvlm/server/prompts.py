"""The prompt of a request: text or token ids for completions, the rendered chat template for
chat. Text that cannot fit the context is refused before it is tokenized."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvlm.server.errors import APIError
from kvlm.server.limits import ModelLimits
from kvlm.server.protocol import (
    CHAT_ROLES,
    UNSUPPORTED_MESSAGE,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    check_unsupported,
    json_integer,
)
from kvlm.server.tools import ToolPlan, call_text, tool_prompt, tool_result_text
from kvlm.tokenizer import Tokenizer, TokenizerError


@dataclass(frozen=True)
class Prompt:
    """What the engine gets: token ids (always), and the text when the client sent text."""

    text: str | None
    token_ids: list[int]


def completion_prompts(
    request: CompletionRequest, tokenizer: Tokenizer, limits: ModelLimits
) -> list[Prompt]:
    """`prompt` as OpenAI takes it: a text, a list of token ids, or a non-empty list of either
    (one completion each, in order); every prompt non-empty, no list mixing texts and ids."""
    prompt = request.prompt
    if prompt is None:
        raise APIError("prompt is required", param="prompt")
    if isinstance(prompt, str):
        return [_text_prompt(prompt, "prompt", tokenizer, limits)]
    if not isinstance(prompt, list):
        raise APIError(
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}",
            param="prompt",
        )
    if not prompt:
        raise APIError("prompt is empty: give at least one token id or text", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [_text_prompt(p, f"prompt.{i}", tokenizer, limits) for i, p in enumerate(prompt)]
    if all(isinstance(p, list) for p in prompt):
        return [_ids_prompt(p, f"prompt.{i}") for i, p in enumerate(prompt)]
    if any(isinstance(p, (str, list)) for p in prompt):
        kinds = sorted({type(p).__name__ for p in prompt})
        raise APIError(
            f"prompt mixes {', '.join(kinds)} items: send texts only, token-id lists only, "
            "or one list of token ids",
            param="prompt",
        )
    return [_ids_prompt(prompt, "prompt")]


def completion_prompt(
    request: CompletionRequest, tokenizer: Tokenizer, limits: ModelLimits
) -> Prompt:
    """The request's first prompt (what a router keys a request on), checked as all are."""
    return completion_prompts(request, tokenizer, limits)[0]


def _text_prompt(text: str, name: str, tokenizer: Tokenizer, limits: ModelLimits) -> Prompt:
    if not text:
        raise APIError(f"{name} is empty: give at least one character", param=name)
    limits.prompt_length.check(text, name)
    return Prompt(text, tokenizer.encode(text))


def _ids_prompt(items: list[Any], name: str) -> Prompt:
    if not items:
        raise APIError(f"{name} is empty: give at least one token id", param=name)
    token_ids = [json_integer(t) for t in items]
    bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int)]
    if bad:
        raise APIError(
            f"{name} must be a string or a list of token ids (ints), got {bad[0]!r} in the list",
            param=name,
        )
    return Prompt(None, token_ids)  # the engine checks the ids against the vocabulary


def chat_prompt(
    request: ChatCompletionRequest,
    tokenizer: Tokenizer,
    limits: ModelLimits,
    tools: ToolPlan | None = None,
) -> Prompt:
    """The conversation rendered with the model's chat template, then tokenized. With tools
    to call, a template that reads `tools` gets them; another gets `tool_prompt` as (the end
    of) the system message, and earlier calls and tool results written as the model would."""
    if not request.messages:
        raise APIError("messages is empty: give at least one message", param="messages")
    try:
        native = tokenizer.chat_template_reads_tools
    except TokenizerError as e:
        raise APIError(str(e), param="messages") from e
    messages = [_message(m, i, native) for i, m in enumerate(request.messages)]
    offered = tools is not None and tools.parses_calls
    if offered and not native:
        assert tools is not None
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{tool_prompt(tools)}"
        else:
            messages.insert(0, {"role": "system", "content": tool_prompt(tools)})
    rendered_tools = list(tools.callable) if offered and native and tools is not None else None
    try:
        text = tokenizer.apply_chat_template(
            messages, request.add_generation_prompt, rendered_tools
        )
    except TokenizerError as e:
        raise APIError(str(e), param="messages") from e
    limits.prompt_length.check(text, "messages")
    return Prompt(text, tokenizer.encode(text, add_special_tokens=False))


def _message(message: ChatMessage, i: int, native: bool) -> dict[str, Any]:
    """One message for the template: a template that reads tools gets calls and results in
    transformers' shape; another gets them as text (`tools.call_text`, a user turn)."""
    check_unsupported(message, UNSUPPORTED_MESSAGE, prefix=f"messages.{i}.")
    role = _chat_role(message.role, f"messages.{i}.role")
    content = _text_content(message.content, f"messages.{i}.content")
    if message.tool_calls and role != "assistant":
        raise APIError(
            f"messages.{i}.tool_calls: only assistant messages carry tool calls, this one is "
            f"{message.role!r}",
            param=f"messages.{i}.tool_calls",
        )
    if message.tool_call_id is not None and role != "tool":
        raise APIError(
            f"messages.{i}.tool_call_id goes with role 'tool' (the result of that call), "
            f"not {message.role!r}",
            param=f"messages.{i}.tool_call_id",
        )
    rendered: dict[str, Any] = {"role": role, "content": content}
    if native:
        if message.tool_calls:
            rendered["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _arguments(c.function)},
                }
                for c in message.tool_calls
            ]
        if message.tool_call_id is not None:
            rendered["tool_call_id"] = message.tool_call_id
    elif message.tool_calls:
        calls = [call_text(c.function.name, c.function.arguments) for c in message.tool_calls]
        rendered["content"] = "\n".join(([content] if content else []) + calls)
    elif role == "tool":
        rendered = {"role": "user", "content": tool_result_text(content)}
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _arguments(function: Any) -> Any:
    """transformers' templates take arguments as a dict; OpenAI sends JSON text."""
    try:
        return json.loads(function.arguments)
    except json.JSONDecodeError:
        return function.arguments


def _chat_role(role: str, param: str) -> str:
    if role in CHAT_ROLES:
        return CHAT_ROLES[role]
    if role == "function":
        raise APIError(
            f"{param}: role 'function' is not supported (OpenAI's deprecated functions): "
            "send tool results with role 'tool'",
            param=param,
            code="unsupported_parameter",
        )
    raise APIError(
        f"{param} must be one of {', '.join(map(repr, CHAT_ROLES))}; got {role!r}",
        param=param,
    )


def _text_content(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(
                    f"{param}.{j}: only text parts are supported, got type {kind!r}", param=param
                )
            if not isinstance(part.get("text"), str):
                raise APIError(f"{param}.{j}.text must be a string", param=param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(
        f"{param} must be a string or a list of text parts, got {type(content).__name__}",
        param=param,
    )
