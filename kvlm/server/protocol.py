"""Request bodies of the OpenAI-compatible routes (pydantic), with OpenAI's field names.

Every field OpenAI's specification defines for `CreateCompletionRequest` and
`CreateChatCompletionRequest` is declared here (tests hold the list to that specification and
to the `openai` package's types), so none is dropped silently: a field kvlm honours is typed
and used; one it does not is declared `Any` and refused with a 400 naming it (`UNSUPPORTED`)
unless it holds its neutral value. kvlm's extensions (vLLM's names: top_k, min_p, ignore_eos,
cache_salt, ...) are declared too, and anything else is an unknown field: 400, as OpenAI answers.

Types are strict (`true` is not a token count, `"0.5"` is not a temperature; `3.0` is an
integer, as JSON Schema says); ranges are checked later, where the limit is known (`params.py`,
`SamplingParams`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from kvlm.sampling.press import MAX_FUTURE_POSITIONS, PRESS_METHODS
from kvlm.server.errors import APIError, validation_error

Number = StrictFloat  # accepts JSON ints too, never booleans or strings


def json_integer(value: Any) -> Any:
    """JSON Schema's integers include `3.0` (OpenAI's schema types these fields "integer"):
    an integral float becomes an int; anything else is left as it is, for the type check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[StrictInt, BeforeValidator(json_integer)]  # 3 and 3.0, never true or "3"


def _schema(**extra: Any) -> Any:
    """A field (default None) whose published JSON schema also says `extra`: the ranges and
    shapes this module leaves to params.py / SamplingParams, so clients and fuzzers see them
    while the 400 messages stay kvlm's own."""
    return Field(default=None, json_schema_extra=extra)


def _range(low: float, high: float | None = None, **more: Any) -> Any:
    return _schema(minimum=low, **({} if high is None else {"maximum": high}), **more)


# Roles the chat templates understand; "developer" is OpenAI's newer name for "system".
CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
_TEXT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PROMPT_IDS = {**_TOKEN_IDS, "minItems": 1}
_KV_PRESS = {
    "type": "object",
    "required": ["method"],
    "additionalProperties": False,
    "properties": {
        "method": {"enum": list(PRESS_METHODS)},
        "ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "window": {"type": "integer", "minimum": 1},
        "num_sinks": {"type": "integer", "minimum": 0},
        "num_future_positions": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_FUTURE_POSITIONS,
        },
        "budget": {"type": "integer", "minimum": 1},  # tova's, and only tova's
    },
}
# n and best_of at most: each sequence is a running request of its own, and a server runs
# 32 at once by default (max_num_seqs), so more would only queue behind the first ones
MAX_SEQUENCES = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None
    include_obfuscation: Any = None  # only false: kvlm adds no obfuscation field


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's structured outputs."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: StrictStr
    description: StrictStr | None = None
    schema_: dict[StrictStr, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None  # kvlm always holds the output to the schema


class ResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", ...}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[StrictStr, Any] | StrictStr | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None  # Lark (llguidance's dialect) or GBNF
    json_object: StrictBool | None = None


class SamplingRequest(BaseModel):
    """The fields `/v1/completions` and `/v1/chat/completions` share."""

    model_config = ConfigDict(extra="forbid")

    # OpenAI's fields that kvlm honours
    model: StrictStr | None = None
    max_tokens: Integer | None = _range(1)
    temperature: Number | None = _range(0, 2)
    top_p: Number | None = _schema(exclusiveMinimum=0, maximum=1)
    presence_penalty: Number | None = _range(-2, 2)  # over generated tokens
    frequency_penalty: Number | None = _range(-2, 2)  # over generated tokens
    # {"token id": bias}
    logit_bias: dict[StrictStr, Number] | None = _schema(
        propertyNames={"pattern": "^[0-9]+$"},
        additionalProperties={"type": "number", "minimum": -100, "maximum": 100},
    )
    seed: Integer | None = _range(-(2**63), 2**64 - 1)  # OpenAI's are signed
    # str | list[str]; checked by SamplingParams
    stop: Any = _schema(anyOf=[_TEXT, {"type": "array", "items": _TEXT}, {"type": "null"}])
    n: Integer | None = _range(1, MAX_SEQUENCES)  # completions per prompt
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # an end-user id: accepted, changes nothing
    # kvlm's extensions (vLLM's names)
    top_k: Integer | None = _range(-1)
    min_p: Number | None = _range(0, 1)
    repetition_penalty: Number | None = _schema(exclusiveMinimum=0)
    min_tokens: Integer | None = _range(0)
    stop_token_ids: Any = _schema(anyOf=[_TOKEN_IDS, {"type": "null"}])  # SamplingParams checks
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    cache_salt: StrictStr | None = None
    prefix_adapter: StrictStr | None = None  # a prefix-tuning adapter the server loaded
    # {"method": ..., "ratio": ..., "window": ..., "num_sinks": ...}: compress the prompt's KV
    # cache once it is prefilled, or {"method": "tova", "budget": N}: keep N tokens while
    # generating (sampling/press.py); checked by server/press.py
    kv_press: Any = _schema(anyOf=[_KV_PRESS, {"type": "null"}])
    # Structured outputs (llguidance): OpenAI's response_format (on completions too, as vLLM),
    # vLLM's structured_outputs object and its older guided_* fields; at most one of them.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[StrictStr, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    # str, list of token ids, or a list of either (one choice per prompt, in order)
    prompt: Any = Field(
        json_schema_extra={"anyOf": [
            _TEXT,
            _PROMPT_IDS,
            {"type": "array", "items": _TEXT, "minItems": 1},
            {"type": "array", "items": _PROMPT_IDS, "minItems": 1},
        ]}
    )  # fmt: skip
    # OpenAI's default for completions; 0 only with echo (the prompt scored, nothing generated)
    max_tokens: Integer | None = Field(default=16, json_schema_extra={"minimum": 0})
    # top log-probabilities per token (OpenAI's legacy API allows 5, kvlm as vLLM 20); with
    # echo, of the prompt's tokens too
    logprobs: Integer | None = _range(0, 20)
    echo: StrictBool | None = None  # prepend the prompt to the completion
    suffix: Any = None  # only unset
    # sequences per prompt, of which the n best (cumulative logprob) return; not with stream
    best_of: Integer | None = _range(1, MAX_SEQUENCES)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant message."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr
    type: Literal["function"]
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(json_schema_extra={"pattern": "^[a-zA-Z0-9_-]{1,64}$"})
    description: StrictStr | None = None
    parameters: dict[StrictStr, Any] | None = None  # a JSON schema of the arguments
    strict: StrictBool | None = None  # kvlm always holds the arguments to the schema


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # checked in prompts.py, which names the roles kvlm supports
    role: StrictStr = Field(json_schema_extra={"enum": list(CHAT_ROLES)})
    # str, or a list of {"type": "text", "text": ...} parts
    content: Any = _schema(
        anyOf=[
            {"type": "string"},
            {"type": "array", "items": {
                "type": "object", "required": ["type", "text"], "additionalProperties": False,
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
            }},
            {"type": "null"},
        ]
    )  # fmt: skip
    name: StrictStr | None = None  # passed on to the chat template
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls (rendered)
    tool_call_id: StrictStr | None = None  # a tool message: the call it answers
    # OpenAI's fields of assistant messages that kvlm cannot honour
    function_call: Any = None
    refusal: Any = None
    audio: Any = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Integer | None = _range(1)  # the newer name for max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: Integer | None = _range(0, 20)  # with logprobs: alternatives per token
    metadata: dict[StrictStr, StrictStr] | None = None  # tags for stored completions: no effect
    safety_identifier: StrictStr | None = None  # an end-user id: accepted, changes nothing
    prompt_cache_key: StrictStr | None = None  # a routing hint: kvlm's prefix cache needs none
    tools: list[ToolDefinition] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tool_choice: Any = _schema(
        anyOf=[
            {"enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["type", "function"], "properties": {
                "type": {"const": "function"},
                "function": {"type": "object", "required": ["name"],
                             "properties": {"name": {"type": "string"}}},
            }},
        ]
    )  # fmt: skip
    parallel_tool_calls: StrictBool | None = None  # default true: several calls in one answer
    # OpenAI's fields kvlm refuses unless neutral (see UNSUPPORTED)
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    modalities: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    # kvlm's extension (vLLM's name)
    add_generation_prompt: StrictBool = True


@dataclass(frozen=True)
class Unsupported:
    """An OpenAI field kvlm does not honour: refused unless `neutral(value)`."""

    reason: str  # why, and what to send instead
    neutral: Callable[[Any], bool] = lambda value: value is None


def _one_of(*values: Any) -> Callable[[Any], bool]:
    """None or one of `values` (same type too: `0` is not `false`, `true` is not `1`)."""
    return lambda value: value is None or any(type(value) is type(v) and value == v for v in values)


_NO_FUNCTIONS = "kvlm implements tools, not the deprecated functions: send tools and tool_choice"
UNSUPPORTED_COMPLETION: dict[str, Unsupported] = {
    "suffix": Unsupported("kvlm does not fill in text before a suffix", _one_of("")),
}
UNSUPPORTED_CHAT: dict[str, Unsupported] = {
    "audio": Unsupported("kvlm generates text only"),
    "function_call": Unsupported(_NO_FUNCTIONS, _one_of("none")),
    "functions": Unsupported(_NO_FUNCTIONS, _one_of([])),
    "modalities": Unsupported('kvlm generates text only; send ["text"]', _one_of(["text"])),
    "moderation": Unsupported("kvlm runs no moderation"),
    "prediction": Unsupported("kvlm has no predicted outputs"),
    "prompt_cache_options": Unsupported("kvlm's prefix cache takes no options"),
    "prompt_cache_retention": Unsupported(
        'kvlm keeps cached prefixes in memory only; send "in_memory"', _one_of("in_memory")
    ),
    "reasoning_effort": Unsupported("kvlm's models are not reasoning models"),
    "service_tier": Unsupported(
        'kvlm has one service tier; send "auto" or "default"', _one_of("auto", "default")
    ),
    "store": Unsupported("kvlm does not store completions", _one_of(False)),
    "verbosity": Unsupported("kvlm's models take no verbosity setting"),
    "web_search_options": Unsupported("kvlm does not search the web"),
}
UNSUPPORTED_STREAM_OPTIONS: dict[str, Unsupported] = {
    "include_obfuscation": Unsupported("kvlm adds no obfuscation field", _one_of(False)),
}
UNSUPPORTED_MESSAGE: dict[str, Unsupported] = {
    "function_call": Unsupported(_NO_FUNCTIONS),
    "refusal": Unsupported("kvlm's chat templates have no refusal field; send it as content"),
    "audio": Unsupported("kvlm takes text only"),
}


def check_unsupported(model: BaseModel, table: dict[str, Unsupported], prefix: str = "") -> None:
    """400 naming the first field of `table` that `model` holds with a non-neutral value."""
    for name, rule in table.items():
        value = getattr(model, name)
        if not rule.neutral(value):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise APIError(
                f"{prefix}{name} is not supported ({rule.reason}); got {shown}",
                param=f"{prefix}{name}",
                code="unsupported_parameter",
            )


Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """The request body as `model`, whatever the Content-Type; 400 with the reason if not."""
    if not raw.strip():
        raise APIError("request body is empty: send a JSON object", code="bad_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(f"request body is not valid JSON: {e}", code="bad_json") from e
    if not isinstance(data, dict):
        raise APIError(
            f"request body must be a JSON object, got a JSON {type(data).__name__}",
            code="bad_json",
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from e
