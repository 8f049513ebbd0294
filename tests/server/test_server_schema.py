"""The API as clients and fuzzers see it: /openapi.json is published, every field of OpenAI's
published request specification is either honoured or refused by name, and a schemathesis
run against the published schema finds no server error."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_server import API_KEY, MODEL_NAME, LiveServer
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import LLMEngine
from kvlm.server import build_app
from kvlm.server.launch import ServerThread, bind_socket
from kvlm.server.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    ChatCompletionRequest,
    CompletionRequest,
)

# OpenAI's fields kvlm implements, and those it accepts because they change nothing it
# returns (identifiers, hints, tags); every other OpenAI field must be refused by name.
HONOURED_COMPLETION = {
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "temperature", "top_p",
}  # fmt: skip
HONOURED_CHAT = {
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens",
    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
    "temperature", "top_logprobs", "top_p",
}  # fmt: skip
NO_EFFECT = {"user", "metadata", "safety_identifier", "prompt_cache_key"}


def _openai_fields(module: object) -> set[str]:
    streaming = module.CompletionCreateParamsStreaming  # type: ignore[attr-defined]
    return set(streaming.__required_keys__) | set(streaming.__optional_keys__)


@pytest.mark.parametrize(
    ("module", "model", "honoured", "unsupported"),
    [
        (completion_create_params, CompletionRequest, HONOURED_COMPLETION, UNSUPPORTED_COMPLETION),
        (chat_create_params, ChatCompletionRequest, HONOURED_CHAT, UNSUPPORTED_CHAT),
    ],
)
def test_every_openai_field_is_honoured_or_refused_by_name(
    module: object, model: type, honoured: set, unsupported: dict
) -> None:
    openai_fields = _openai_fields(module)
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
    properties = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"logit_bias", "tools", "response_format", "min_tokens"} <= set(properties)
    assert "/v1/models" in schema["paths"] and "/health" in schema["paths"]


@pytest.fixture(scope="module")
def fuzz_url() -> Iterator[str]:
    """A server with a 48-token context, so every valid request the fuzzer makes is short."""
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model="smollm2", max_model_len=48)))
    app = build_app(engine, MODEL_NAME, API_KEY)
    thread = ServerThread(app, bind_socket("127.0.0.1", 0))
    thread.start()
    try:
        yield thread.url
    finally:
        thread.stop()
        engine.shutdown()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(fuzz_url: str, path: str, mode: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    strategy = schema[path]["POST"].as_strategy(schemathesis.GenerationMode(mode))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    statuses: list[int] = []

    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        if mode == "positive" and isinstance(case.body, dict):
            case.body["model"] = MODEL_NAME  # else nearly every body names an unknown model
        response = case.call(base_url=fuzz_url, headers=headers, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)

    run()
    print(f"{path} {mode}: statuses {sorted(set(statuses))}, {statuses.count(200)} answered")
