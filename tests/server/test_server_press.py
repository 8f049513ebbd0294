"""The `kv_press` extension over HTTP (issue 21): a pressed request answers 200 on both routes
and its usage shows the bytes its tables held after the press (fewer than its peak); every bad
press is a 400 naming `kv_press`, whether the field, the engine or the prompt refuses it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import API_KEY, MODEL_NAME, LiveServer

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import LLMEngine
from kvlm.server import build_app

BLOCK_SIZE = 16  # EngineConfig's default
NUM_PROMPT_TOKENS = 128
DOC = (
    "A press scores each cached token per layer and per head, keeps the tokens attention "
    "needs and gives the other blocks back to the pool for other requests. "
)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def _prompt_ids(server: LiveServer) -> list[int]:
    ids = server.engine.engine.tokenizer.encode(DOC * 10)
    assert len(ids) >= NUM_PROMPT_TOKENS
    return ids[:NUM_PROMPT_TOKENS]


def _error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "kv_press"
    return error


def _blocks_bytes(server: LiveServer, num_tokens: int) -> int:
    (spec,) = server.engine.engine.kv_specs
    return -(-num_tokens // BLOCK_SIZE) * spec.page_nbytes


@pytest.mark.parametrize(
    "press",
    [
        {"method": "knorm"},  # ratio 0.5 by default
        {"method": "streaming_llm", "ratio": 0.5, "num_sinks": 4},
        {"method": "snapkv", "ratio": 0.5, "window": 32.0},  # 32.0 is an integer in JSON
        {"method": "expected_attention", "ratio": 0.5, "num_future_positions": 256},
        {"method": "tova", "budget": 64.0},  # keeps 64 of the 128 while generating
    ],
)
def test_a_pressed_completion_holds_fewer_kv_bytes(
    http: httpx.Client, server: LiveServer, press: dict
) -> None:
    body = {"model": MODEL_NAME, "prompt": _prompt_ids(server), "max_tokens": 4}
    plain = http.post("/v1/completions", json={**body, "temperature": 0})
    pressed = http.post("/v1/completions", json={**body, "temperature": 0, "kv_press": press})
    assert plain.status_code == 200 and pressed.status_code == 200, pressed.text
    assert plain.json()["usage"]["kv_pressed_bytes"] is None
    usage = pressed.json()["usage"]
    assert usage["prompt_tokens"] == NUM_PROMPT_TOKENS and usage["completion_tokens"] == 4
    # half the prompt's 128 tokens kept: 4 blocks of 16 instead of 8
    assert usage["kv_pressed_bytes"] == _blocks_bytes(server, NUM_PROMPT_TOKENS // 2)
    assert usage["kv_peak_bytes"] == _blocks_bytes(server, NUM_PROMPT_TOKENS)
    assert server.wait_idle()["kvlm_kv_cache_blocks_used"] == 0


def test_a_pressed_chat_completion(http: httpx.Client, server: LiveServer) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": DOC * 4 + "What does a press keep?"}],
        "max_tokens": 4,
        "temperature": 0,
        "kv_press": {"method": "snapkv", "ratio": 0.75, "window": 16},
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    kept = int(usage["prompt_tokens"] * 0.25)
    assert usage["kv_pressed_bytes"] == _blocks_bytes(server, kept) < usage["kv_peak_bytes"]


# (the field's value, words its 400 must contain)
BAD_PRESSES = [
    ({"method": "h2o"}, ["unknown kv press 'h2o'", "snapkv"]),
    ({"method": 3}, ["unknown kv press 3"]),
    ({"ratio": 0.5}, ["kv_press needs a method"]),
    ({"method": "knorm", "ratio": 1.0}, ["[0, 1)", "1.0"]),
    ({"method": "knorm", "ratio": -0.1}, ["[0, 1)", "-0.1"]),
    ({"method": "knorm", "ratio": "half"}, ["ratio must be a number", "'half'"]),
    ({"method": "knorm", "ratio": True}, ["ratio must be a number", "True"]),
    ({"method": "snapkv", "window": 0}, ["window must be >= 1", "0"]),
    ({"method": "snapkv", "window": 2.5}, ["window must be an int", "2.5"]),
    ({"method": "streaming_llm", "num_sinks": -1}, ["num_sinks must be >= 0", "-1"]),
    ({"method": "expected_attention", "num_future_positions": 0}, ["in [1, 65536]", "0"]),
    ({"method": "knorm", "size": 3}, ["no field 'size'", "ratio, window, num_sinks, num_fut"]),
    ({"method": "tova"}, ["tova needs a budget"]),
    ({"method": "tova", "budget": 64, "ratio": 0.5}, ["takes no ratio (got 0.5)"]),
    ({"method": "tova", "budget": 0}, ["budget must be >= 1 token, got 0"]),
    ({"method": "tova", "budget": 2.5}, ["budget must be an int", "2.5"]),
    ({"method": "snapkv", "budget": 64}, ["snapkv takes no budget (got 64)"]),
    # a budget under a block (16 tokens): the engine refuses it at add_request
    ({"method": "tova", "budget": 8}, ["under one block of 16", "give budget >= 16"]),
    ("snapkv", ["must be an object", "str"]),
    ([{"method": "knorm"}], ["must be an object", "list"]),
    # the prompt is not longer than snapkv's window: the engine refuses it at add_request
    ({"method": "snapkv", "window": 4000}, ["snapkv scores the", "window of 4000"]),
    ({"method": "expected_attention", "num_sinks": 4000}, ["keeps the first 4000 tokens"]),
]


@pytest.mark.parametrize(("press", "words"), BAD_PRESSES)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_bad_press_is_a_400_naming_kv_press(
    http: httpx.Client, route: str, press: object, words: list[str]
) -> None:
    if route == "/v1/completions":
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}
    else:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
        }
    error = _error(http.post(route, json={**body, "kv_press": press}))
    for word in words:
        assert word in error["message"], error["message"]
    assert http.post(route, json=body).status_code == 200  # still serving


def test_a_server_without_a_cache_refuses_a_press() -> None:
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model="smollm2", use_cache=False)))
    try:
        client = TestClient(build_app(engine, MODEL_NAME, API_KEY))
        body = {"prompt": "Hello", "max_tokens": 2, "kv_press": {"method": "knorm"}}
        response = client.post(
            "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert "runs without one (use_cache=False)" in _error(response)["message"]
    finally:
        engine.shutdown()
