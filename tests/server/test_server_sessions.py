"""Session routes over HTTP: save a conversation's K/V on the server, restore it into the prefix
cache (the next request is a prefix hit), behind the API key, with clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import API_KEY, MODEL_NAME, TIMEOUT, LiveServer

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import LLMEngine
from kvlm.server import build_app
from kvlm.server.launch import ServerThread, bind_socket

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant. " * 20},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


@pytest.fixture(scope="module")
def session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    session_dir = tmp_path_factory.mktemp("sessions")
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model="smollm2", num_threads=1)))
    app = build_app(engine, MODEL_NAME, API_KEY, session_dir=session_dir)
    thread = ServerThread(app, bind_socket("127.0.0.1", 0))
    thread.start()
    try:
        yield LiveServer(thread.url, engine), session_dir
    finally:
        thread.stop()
        engine.shutdown()


@pytest.fixture(scope="module")
def http(session_server: tuple[LiveServer, Path]) -> Iterator[httpx.Client]:
    with session_server[0].client() as client:
        yield client


def _next_turn(http: httpx.Client) -> dict:
    body = {
        "model": MODEL_NAME,
        "messages": [*CONVERSATION, {"role": "user", "content": "Another?"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_saved_session_restores_as_a_prefix_hit(
    http: httpx.Client, session_server: tuple[LiveServer, Path]
) -> None:
    saved = http.post("/v1/sessions/colours", json={"messages": CONVERSATION})
    assert saved.status_code == 200, saved.text
    facts = saved.json()
    assert facts["num_saved_tokens"] == facts["num_tokens"] // 16 * 16 > 100
    assert (session_server[1] / "colours.kvs").stat().st_size == facts["bytes"]
    reference = _next_turn(http)

    # Forget every cached prefix, then restore: the next turn hits the restored blocks.
    server = session_server[0]
    assert server.wait_idle()["kvlm_kv_cache_blocks_used"] == 0
    server.engine.call(lambda e: e.kv_cache.reset_prefix_cache()).result(timeout=10)
    restored = http.post("/v1/sessions/colours/restore")
    assert restored.status_code == 200, restored.text
    body = restored.json()
    assert body["messages"] == CONVERSATION and body["refused"] is None
    assert body["num_restored_tokens"] == facts["num_saved_tokens"]
    again = _next_turn(http)
    assert again["choices"][0]["message"] == reference["choices"][0]["message"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= facts["num_saved_tokens"]


def test_restore_of_a_damaged_file_is_refused_and_recomputes(
    http: httpx.Client, session_server: tuple[LiveServer, Path]
) -> None:
    assert http.post("/v1/sessions/damaged", json={"messages": CONVERSATION}).status_code == 200
    path = session_server[1] / "damaged.kvs"
    path.write_bytes(path.read_bytes()[:-100])
    body = http.post("/v1/sessions/damaged/restore").json()
    assert body["num_restored_tokens"] == 0 and "cut short" in body["refused"]
    assert body["messages"] == CONVERSATION  # the header is sound: the client can go on


@pytest.mark.parametrize(
    ("method", "path", "json", "status", "message"),
    [
        ("post", "/v1/sessions/../etc", {"messages": CONVERSATION}, 404, None),
        ("post", "/v1/sessions/a%20b", {"messages": CONVERSATION}, 400, "session name"),
        ("post", "/v1/sessions/x", {}, 400, "exactly one of 'messages' and 'prompt_token_ids'"),
        ("post", "/v1/sessions/x", {"prompt_token_ids": [10**9]}, 400, "ids in [0, "),
        ("post", "/v1/sessions/x", {"messages": [], "extra": 1}, 400, "unknown field 'extra'"),
        ("post", "/v1/sessions/never-saved/restore", None, 404, "no session named"),
    ],
)
def test_bad_session_requests_get_clear_errors(
    http: httpx.Client, method: str, path: str, json: dict | None, status: int, message: str | None
) -> None:
    response = http.request(method.upper(), path, json=json)
    assert response.status_code == status, response.text
    if message is not None:
        assert message in response.json()["error"]["message"]


def test_session_routes_need_the_api_key(session_server: tuple[LiveServer, Path]) -> None:
    url = f"{session_server[0].url}/v1/sessions/colours/restore"
    response = httpx.post(url, timeout=TIMEOUT)
    assert response.status_code == 401


def test_sessions_are_off_without_a_session_dir(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post("/v1/sessions/x", json={"messages": CONVERSATION})
    assert response.status_code == 404
    assert "--session-dir" in response.json()["error"]["message"]
