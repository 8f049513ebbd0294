"""Request bodies of the OpenAI-compatible routes (pydantic), with OpenAI's field names.

Types are strict (`true` is not a token count, `"0.5"` is not a temperature); ranges are checked
later, where the limit is known (`params.py`, `SamplingParams`). Fields OpenAI defines that
kvlm does not implement are accepted only at their neutral value; unknown fields are ignored.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from kvlm.server.errors import APIError, validation_error

Number = StrictFloat  # accepts JSON ints too, never booleans or strings


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """The fields `/v1/completions` and `/v1/chat/completions` share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    presence_penalty: Number | None = None  # only 0 (not implemented)
    frequency_penalty: Number | None = None  # only 0 (not implemented)
    seed: StrictInt | None = None
    stop: Any = None  # str | list[str]; checked by SamplingParams
    stop_token_ids: Any = None  # list[int]; checked by SamplingParams
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    cache_salt: StrictStr | None = None
    user: StrictStr | None = None  # accepted and ignored

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: Any = None  # str, list of token ids, or a one-element list of either
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    logprobs: StrictInt | None = None  # top log-probabilities per token (0..20)
    echo: StrictBool = False  # only false
    suffix: StrictStr | None = None  # only unset
    best_of: StrictInt | None = None  # only 1


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name", passed on to the chat template

    role: StrictStr
    content: Any = None  # str, or a list of {"type": "text", "text": ...} parts


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None  # the newer name for max_tokens
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None  # with logprobs: alternatives per token (0..20)
    add_generation_prompt: StrictBool = True


Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """The request body as `model`, whatever the Content-Type; 400 with the reason if not."""
    if not raw.strip():
        raise APIError("request body is empty: send a JSON object", code="bad_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
