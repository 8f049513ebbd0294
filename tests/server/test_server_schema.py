"""The API as clients and fuzzers see it: /openapi.json is published, every field of OpenAI's
published request specification (and of the `openai` package's types) is either honoured or
refused by name, and a schemathesis run against the published schema finds no server error
(`test_server_fuzz_openai.py` runs it against OpenAI's own)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from live_server import API_KEY, MODEL_NAME, LiveServer
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from openai_spec import (
    FUZZ_SETTINGS,
    MESSAGE_SCHEMA,
    STREAM_OPTIONS_SCHEMA,
    official_spec,
    properties,
)

from kvlm.server.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    UNSUPPORTED_MESSAGE,
    UNSUPPORTED_STREAM_OPTIONS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
)

# OpenAI's fields kvlm implements, and those it accepts because they change nothing it
# returns (identifiers, hints, tags); every other OpenAI field must be refused by name.
HONOURED_COMPLETION = {
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "best_of", "presence_penalty", "seed", "stop", "stream", "stream_options", "temperature",
    "top_p",
}  # fmt: skip
HONOURED_CHAT = {
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens",
    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
    "temperature", "top_logprobs", "top_p", "response_format", "tools", "tool_choice",
    "parallel_tool_calls",
}  # fmt: skip
NO_EFFECT = {"user", "metadata", "safety_identifier", "prompt_cache_key"}


HONOURED_MESSAGE = {"role", "content", "name", "tool_calls", "tool_call_id"}
HONOURED_STREAM_OPTIONS = {"include_usage"}


def _sdk_fields(module: object) -> set[str]:
    streaming = module.CompletionCreateParamsStreaming  # type: ignore[attr-defined]
    return set(streaming.__required_keys__) | set(streaming.__optional_keys__)


@pytest.mark.parametrize(
    ("schema_name", "module", "model", "honoured", "unsupported"),
    [
        (
            "CreateCompletionRequest",
            completion_create_params,
            CompletionRequest,
            HONOURED_COMPLETION,
            UNSUPPORTED_COMPLETION,
        ),
        (
            "CreateChatCompletionRequest",
            chat_create_params,
            ChatCompletionRequest,
            HONOURED_CHAT,
            UNSUPPORTED_CHAT,
        ),
        (MESSAGE_SCHEMA, None, ChatMessage, HONOURED_MESSAGE, UNSUPPORTED_MESSAGE),
        (
            STREAM_OPTIONS_SCHEMA,
            None,
            StreamOptions,
            HONOURED_STREAM_OPTIONS,
            UNSUPPORTED_STREAM_OPTIONS,
        ),
    ],
)
def test_every_openai_field_is_honoured_or_refused_by_name(
    schema_name: str, module: object, model: type, honoured: set, unsupported: dict
) -> None:
    """Against OpenAI's published specification (every role's message, allOf and $ref
    followed) and the `openai` package's types, whichever is newer."""
    openai_fields = set(properties(official_spec(), schema_name))
    assert honoured <= openai_fields, "a field OpenAI no longer defines?"
    if module is not None:
        openai_fields |= _sdk_fields(module)
    assert openai_fields <= set(model.model_fields), "declare it, or it is an 'unknown field'"
    unaccounted = openai_fields - honoured - NO_EFFECT - set(unsupported)
    assert not unaccounted, f"OpenAI fields neither implemented nor refused: {unaccounted}"
    assert not (honoured & set(unsupported))


def test_openapi_json_is_published_without_the_key(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    for path, model in [("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest")]:  # fmt: skip
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert schema["paths"][path]["post"]["security"] == [{"bearer": []}]
    chat_fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"logit_bias", "tools", "response_format", "min_tokens"} <= set(chat_fields)
    assert "/v1/models" in schema["paths"] and "/health" in schema["paths"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(fuzz_server: LiveServer, path: str, mode: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    strategy = schema[path]["POST"].as_strategy(schemathesis.GenerationMode(mode))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    statuses: list[int] = []

    @settings(FUZZ_SETTINGS, max_examples=30)
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        if mode == "positive" and isinstance(case.body, dict):
            case.body["model"] = MODEL_NAME  # else nearly every body names an unknown model
        response = case.call(base_url=fuzz_server.url, headers=headers, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)

    run()
    print(f"{path} {mode}: statuses {sorted(set(statuses))}, {statuses.count(200)} answered")
