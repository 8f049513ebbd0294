"""Bad input over raw HTTP: a 400 (401 for auth) with OpenAI's error object and a message that
names the value and the limit; the server keeps serving afterwards."""

from __future__ import annotations

import httpx
import pytest
from live_server import MODEL_NAME, LiveServer

LONG_PROMPT = "hello " * 9000  # > 8,192 tokens


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def _completion(**fields: object) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **fields}


def _chat(**fields: object) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], **fields}


# (body, the param the error names, words the message must contain)
BAD_COMPLETIONS = [
    (_completion(model="gpt-4"), "model", ["'gpt-4'", f"'{MODEL_NAME}'"]),
    (_completion(max_tokens=0), "max_tokens", ["max_tokens", "1", "0"]),
    (_completion(max_tokens=-5), "max_tokens", ["max_tokens", "-5"]),
    (_completion(max_tokens=10_000), "max_tokens", ["10,000", "8,192"]),
    (_completion(max_tokens="many"), "max_tokens", ["max_tokens", "'many'"]),
    (_completion(max_tokens=True), "max_tokens", ["max_tokens", "True"]),
    (_completion(max_tokens=2.5), "max_tokens", ["max_tokens", "2.5"]),  # 2.0 is an integer
    (_completion(n=0), "n", ["n must be in [1, 16]", "0"]),
    (_completion(n=17), "n", ["n must be in [1, 16]", "17"]),
    (_completion(n=3, best_of=2), "best_of", ["best_of must be >= n (3)", "2"]),
    (_completion(n=2, temperature=0), "n", ["n must be 1 with greedy sampling", "2"]),
    (_completion(best_of=2, stream=True), "best_of", ["cannot be combined with stream"]),
    (_completion(temperature=2.5), "temperature", ["temperature", "[0, 2]", "2.5"]),
    (_completion(temperature=-0.1), "temperature", ["temperature", "-0.1"]),
    (_completion(temperature="hot"), "temperature", ["temperature", "'hot'"]),
    (_completion(top_p=0), "top_p", ["top_p", "(0, 1]", "0"]),
    (_completion(top_k=-2), "top_k", ["top_k", "-2"]),
    (_completion(seed=-(2**63) - 1), "seed", ["seed", str(-(2**63) - 1)]),  # OpenAI's: int64
    (_completion(seed=2**64), "seed", ["seed", str(2**64)]),
    (_completion(stop=5), "stop", ["stop", "5"]),
    (_completion(logprobs=50), "logprobs", ["logprobs", "20", "50"]),
    (_completion(frequency_penalty=2.5), "frequency_penalty", ["frequency_penalty", "2.5"]),
    (_completion(presence_penalty=-3), "presence_penalty", ["[-2, 2]", "-3"]),
    (_completion(min_tokens=8), "min_tokens", ["min_tokens (8)", "max_tokens (4)"]),
    (_completion(min_tokens=-1), "min_tokens", ["min_tokens", "-1"]),
    (_completion(logit_bias={"abc": 5}), "logit_bias", ["'abc'", "token id", "49151"]),
    (_completion(logit_bias={"-1": 5}), "logit_bias", ["'-1'"]),
    (_completion(logit_bias={"49152": 5}), "logit_bias", ["'49152'", "49151"]),
    (_completion(logit_bias={"5": 101}), "logit_bias", ["[-100, 100]", "101"]),
    (_completion(logit_bias={"5": "up"}), "logit_bias.5", ["'up'"]),
    (_completion(logit_bias=[5]), "logit_bias", ["logit_bias", "[5]"]),
    (_completion(suffix="!"), "suffix", ["suffix is not supported", '"!"']),
    (_completion(best_of=0), "best_of", ["best_of must be in [1, 16]", "0"]),
    (_completion(max_token=5), "max_token", ["unknown field 'max_token'"]),
    (
        _completion(stream_options={"include_obfuscation": True}),
        "stream_options.include_obfuscation",
        ["not supported"],
    ),  # fmt: skip
    (_completion(stream_options={"foo": 1}), "stream_options.foo", ["unknown field"]),
    (_completion(prompt=""), "prompt", ["prompt is empty"]),
    (_completion(prompt=[]), "prompt", ["prompt is empty"]),
    (_completion(prompt=None), "prompt", ["prompt is required"]),
    (_completion(prompt=[1, 2, 10**9]), "prompt", ["1000000000", "49152"]),
    (_completion(prompt=LONG_PROMPT), "prompt", ["9,001", "8,192"]),
    (_completion(prompt={"text": "hi"}), "prompt", ["prompt must be"]),
    (_completion(prompt=[1, 2.5]), "prompt", ["prompt must be", "2.5"]),
    (_completion(cache_salt=7), "cache_salt", ["cache_salt", "7"]),
]

BAD_CHATS = [
    (_chat(messages=[]), "messages", ["messages is empty"]),
    (_chat(messages="Hi"), "messages", ["messages", "'Hi'"]),
    (_chat(messages=[{"content": "Hi"}]), "messages.0.role", ["messages.0.role", "required"]),
    (_chat(messages=[{"role": "user", "content": 5}]), "messages.0.content", ["got int"]),
    (
        _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        "messages.0.content",
        ["image_url"],
    ),
    (_chat(max_completion_tokens=0), "max_completion_tokens", ["max_completion_tokens", "0"]),
    (_chat(max_tokens=9000), "max_tokens", ["9,000", "8,192"]),
    (_chat(n=0), "n", ["n must be in [1, 16]", "0"]),
    (_chat(n=2, temperature=0), "n", ["n must be 1 with greedy sampling", "2"]),
    (_chat(top_logprobs=3), "top_logprobs", ["logprobs=true"]),
    (_chat(logprobs=True, top_logprobs=21), "top_logprobs", ["20", "21"]),
    (_chat(stream="yes"), "stream", ["stream", "'yes'"]),
    (_chat(stream_options={"include_usage": 1}), "stream_options.include_usage", ["1"]),
    (_chat(logit_bias={"x": 1}), "logit_bias", ["'x'"]),
    (_chat(frequency_penalty=-2.01), "frequency_penalty", ["-2.01"]),
    (_chat(echo=True), "echo", ["unknown field 'echo'"]),  # a completions-only field
    (
        _chat(messages=[{"role": "hacker", "content": "Hi"}]),
        "messages.0.role",
        ["'hacker'", "'system', 'developer', 'user', 'assistant'"],
    ),  # fmt: skip
    (
        _chat(messages=[{"role": "user", "content": "4", "tool_call_id": "c1"}]),
        "messages.0.tool_call_id",
        ["role 'tool'"],
    ),  # fmt: skip
    (_chat(messages=[{"role": "function", "content": "4"}]), "messages.0.role", ["function"]),
    (
        _chat(messages=[{"role": "user", "content": "Hi", "mood": "happy"}]),
        "messages.0.mood",
        ["unknown field"],
    ),  # fmt: skip
    (
        _chat(messages=[{"role": "assistant", "tool_calls": [{"id": "c1"}]}]),
        "messages.0.tool_calls.0.type",
        ["required"],
    ),  # fmt: skip
]

# OpenAI's chat fields kvlm does not honour, each with a value that asks for something.
UNSUPPORTED_CHAT_VALUES = {
    "audio": {"voice": "alloy", "format": "mp3"},
    "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "modalities": ["text", "audio"],
    "moderation": {"mode": "block"},
    "prediction": {"type": "content", "content": "Hello"},
    "prompt_cache_options": {"ttl": "1h"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "service_tier": "flex",
    "store": True,
    "verbosity": "low",
    "web_search_options": {},
}
# ... and the neutral values they are accepted with.
NEUTRAL_CHAT_VALUES = {
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "store": False,
    "modalities": ["text"],
    "service_tier": "auto",
    "prompt_cache_retention": "in_memory",
    "metadata": {"team": "kvlm"},
    "user": "u1",
    "safety_identifier": "s1",
    "prompt_cache_key": "k1",
    "stream_options": None,
}


@pytest.fixture(scope="module")
def http(server: LiveServer) -> httpx.Client:
    with server.client() as client:
        yield client


@pytest.mark.parametrize(("body", "param", "words"), BAD_COMPLETIONS)
def test_bad_completion_is_400(http: httpx.Client, body: dict, param: str, words: list) -> None:
    error = _error(http.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


@pytest.mark.parametrize(("body", "param", "words"), BAD_CHATS)
def test_bad_chat_is_400(http: httpx.Client, body: dict, param: str, words: list) -> None:
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


@pytest.mark.parametrize(("name", "value"), UNSUPPORTED_CHAT_VALUES.items())
def test_unsupported_openai_chat_field_is_400_naming_it(
    http: httpx.Client, name: str, value: object
) -> None:
    error = _error(http.post("/v1/chat/completions", json=_chat(**{name: value})), 400)
    assert error["param"] == name and error["code"] == "unsupported_parameter"
    assert error["message"].startswith(f"{name} is not supported (")


def test_neutral_values_of_unsupported_fields_are_accepted(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=_chat(max_tokens=2, **NEUTRAL_CHAT_VALUES))
    assert response.status_code == 200, response.text
    response = http.post("/v1/completions", json=_completion(suffix="", best_of=1, user="u"))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"model": "smollm2", "prompt": ', ["not valid JSON", "line 1"]),
        (b"[1, 2]", ["JSON object", "list"]),
        (b"", ["empty"]),
        (b"\xff\xfe", ["not valid JSON"]),
    ],
)
def test_malformed_body_is_400(http: httpx.Client, content: bytes, words: list) -> None:
    for route in ("/v1/completions", "/v1/chat/completions"):
        error = _error(http.post(route, content=content), 400)
        assert error["code"] == "bad_json"
        for word in words:
            assert word in error["message"]


def test_streaming_request_refused_before_the_stream_starts(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json=_completion(stream=True, max_tokens=10_000))
    assert _error(response, 400)["param"] == "max_tokens"


def test_api_key_is_required_on_v1_routes(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions")]:
            error = _error(anonymous.request(method, path, json=_completion()), 401)
            assert "missing API key" in error["message"]
            assert error["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer not-the-key"}
        error = _error(anonymous.post("/v1/chat/completions", json=_chat(), headers=wrong), 401)
        assert "invalid API key" in error["message"]
        # checked before the body: a bad key with a broken body is still a 401
        _error(anonymous.post("/v1/completions", content=b"{", headers=wrong), 401)
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200


def test_unknown_route_is_404_error_object(http: httpx.Client) -> None:
    error = _error(http.get("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in error["message"]
    _error(http.get("/v1/completions"), 405)


def test_unexpected_exception_is_500_and_server_survives(
    http: httpx.Client, server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr("kvlm.server.params.completion_prompts", broken)
    num_errors = len(server.errors)
    error = _error(http.post("/v1/completions", json=_completion()), 500)
    assert error["type"] == "server_error"
    assert "injected failure" in error["message"]
    assert len(server.errors) > num_errors  # logged with its traceback
    monkeypatch.undo()
    ok = http.post("/v1/completions", json=_completion(temperature=0))
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_engine_step_failure_fails_the_request_and_serving_goes_on(
    http: httpx.Client, server: LiveServer
) -> None:
    runner = server.engine.engine.runner
    real_run = runner.run

    def fail_once(batch: object) -> object:
        runner.run = real_run  # the next step works again
        raise RuntimeError("injected step failure")

    server.engine.call(lambda engine: setattr(runner, "run", fail_once)).result(timeout=10)
    error = _error(http.post("/v1/completions", json=_completion()), 500)
    assert "injected step failure" in error["message"]
    assert server.wait_idle()["kvlm_kv_cache_blocks_used"] == 0
    server.check_integrity()
    # the same failure mid-stream ends the stream with an error event and [DONE]
    server.engine.call(lambda engine: setattr(runner, "run", fail_once)).result(timeout=10)
    with http.stream("POST", "/v1/completions", json=_completion(stream=True)) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert "injected step failure" in events[-2] and events[-1] == "data: [DONE]"
    server.check_integrity()
    ok = http.post("/v1/chat/completions", json=_chat(max_tokens=4))
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_health_after_all_of_that(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
