"""The /cache routes over HTTP: the API key (header, query parameter, cookie), the event
stream's snapshot and deltas, block look-ups and their errors, and how deltas merge."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import httpx
from fastapi.testclient import TestClient
from live_server import API_KEY, MODEL_NAME, TIMEOUT, LiveServer

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import LLMEngine
from kvlm.server import build_app
from kvlm.server.cache_view import CacheDelta, CacheStats, RequestView


def _events(
    server: LiveServer, last: Callable[[dict], bool], out: list[dict] | None = None, **kwargs
) -> list[dict]:
    """The data events of /cache/events (appended to `out` as they come), up to the first for
    which `last` is true."""
    out = [] if out is None else out
    with httpx.stream("GET", f"{server.url}/cache/events", timeout=TIMEOUT, **kwargs) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[len("data: ") :]))
                if last(out[-1]):
                    break
    return out


def test_the_key_is_taken_from_the_header_the_query_or_the_cookie(server: LiveServer) -> None:
    missing = httpx.get(f"{server.url}/cache", timeout=TIMEOUT)
    assert missing.status_code == 401
    assert "/cache?api_key=<key>" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{server.url}/cache", params={"api_key": "nope"}, timeout=TIMEOUT)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert "the kvlm_api_key cookie) is not the one" in wrong.json()["error"]["message"]
    assert httpx.get(f"{server.url}/cache/events", timeout=TIMEOUT).status_code == 401
    page = httpx.get(f"{server.url}/cache", params={"api_key": API_KEY}, timeout=TIMEOUT)
    assert page.status_code == 200 and "<canvas" in page.text
    cookie = page.headers["set-cookie"]
    assert "kvlm_api_key=" in cookie and "HttpOnly" in cookie and "Path=/cache" in cookie
    by_header = httpx.get(f"{server.url}/cache", headers=server.headers, timeout=TIMEOUT)
    assert by_header.status_code == 200
    [snapshot] = _events(server, lambda e: True, cookies={"kvlm_api_key": API_KEY})
    assert snapshot["type"] == "snapshot"


def test_the_stream_starts_with_the_pool_and_follows_a_request(server: LiveServer) -> None:
    server.wait_idle()
    events: list[dict] = []
    finished = lambda e: bool(e.get("removed"))  # noqa: E731  the request let go of its blocks
    reader = threading.Thread(
        target=_events, args=(server, finished, events), kwargs={"headers": server.headers}
    )
    reader.start()
    body = {"model": MODEL_NAME, "prompt": "Count: one two", "max_tokens": 8, "ignore_eos": True}
    with server.client() as client:
        while not events:  # subscribed: the snapshot arrived
            threading.Event().wait(0.05)
        assert client.post("/v1/completions", json=body).status_code == 200
    reader.join(TIMEOUT.read)
    snapshot, deltas = events[0], events[1:]
    [group] = snapshot["groups"]
    assert group["num_blocks"] == len(snapshot["block_states"][0])
    assert snapshot["block_states"][0][0] == "0"  # the null block is never handed out
    assert all(e["type"] == "delta" for e in deltas)
    seen = [r for d in deltas for r in d["requests"]]
    assert seen and seen[0]["block_tables"] is not None  # a new request comes with its table
    assert max(r["num_computed_tokens"] for r in seen) > seen[0]["num_computed_tokens"]


def test_block_lookups(server: LiveServer) -> None:
    with server.client() as client:
        ok = client.get("/cache/blocks/0/1")
        assert ok.status_code == 200 and ok.json()["block_id"] == 1
        no_block = client.get("/cache/blocks/0/10000000")
        assert no_block.status_code == 404 and "has blocks 1 to" in no_block.text
        assert client.get("/cache/blocks/0/0").status_code == 404  # the null block
        assert client.get("/cache/blocks/7/1").status_code == 404


def _delta(blocks: dict[int, int], requests: list[RequestView], removed: list[str], step: int):
    stats = CacheStats(
        step=step,
        num_running=len(requests),
        num_waiting=0,
        bytes_used=[0],
        bytes_total=[1],
        prefix_queries=0,
        prefix_hits=0,
    )
    return CacheDelta(blocks=[blocks], requests=requests, removed=removed, stats=stats)


def _request(rid: str, computed: int, tables: list[list[int]] | None) -> RequestView:
    return RequestView(
        id=rid,
        num_tokens=computed + 1,
        num_computed_tokens=computed,
        num_prompt_tokens=1,
        num_cached_tokens=0,
        block_tables=tables,
    )


def test_merged_deltas_have_the_effect_of_both() -> None:
    first = _delta({1: 1, 2: 1}, [_request("a", 5, [[1, 2]]), _request("b", 3, None)], [], 1)
    later = _delta({2: 0, 3: 1}, [_request("a", 6, None), _request("c", 1, [[3]])], ["b"], 2)
    merged = first.merge(later)
    assert merged.blocks == [{1: 1, 2: 0, 3: 1}]
    assert {r.id: (r.num_computed_tokens, r.block_tables) for r in merged.requests} == {
        "a": (6, [[1, 2]]),  # the later counts, the earlier table
        "c": (1, [[3]]),
    }
    assert merged.removed == ["b"] and merged.stats.step == 2
    back = merged.merge(_delta({}, [_request("b", 0, [[4]])], [], 3))
    assert "b" in back.removed and [r.block_tables for r in back.requests if r.id == "b"] == [
        [[4]]
    ]  # the client drops b, then adds it back with its new table


def test_a_server_without_a_cache_says_so() -> None:
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model="smollm2", use_cache=False)))
    try:
        client = TestClient(build_app(engine, MODEL_NAME))
        for path in ("/cache", "/cache/events", "/cache/blocks/0/1"):
            response = client.get(path)
            assert response.status_code == 404
            assert "without a KV cache (--no-cache)" in response.json()["error"]["message"]
        engine.shutdown()
        stopped = client.get("/cache")
        assert stopped.status_code == 503 and "stopped" in stopped.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_apps_sharing_an_engine_share_its_watch(server: LiveServer) -> None:
    """Tests and embedders build several apps on one engine; the cache has one event log."""
    with TestClient(build_app(server.engine, MODEL_NAME, API_KEY)) as client:
        response = client.get("/cache/blocks/0/1", params={"api_key": API_KEY})
        assert response.status_code == 200 and response.json()["block_id"] == 1


def test_the_watch_costs_nothing_once_the_last_client_left(server: LiveServer) -> None:
    """While a client listens the pools log their changes; once it leaves the log is detached,
    the engine has no observer left and no request (nor a block's text) is kept."""
    from kvlm.server.cache_view_routes import _WATCHES

    watch = _WATCHES[server.engine]

    def state(engine: LLMEngine) -> tuple[bool, bool, int]:
        attached = any(pool.events is not None for pool in engine.kv_cache.pools)
        return attached, bool(watch.subscribers), len(watch.contents[0])

    events: list[dict] = []
    body = {"model": MODEL_NAME, "prompt": "Count: one two three", "max_tokens": 4}
    reader = threading.Thread(
        target=_events,
        args=(server, lambda e: bool(e.get("removed")), events),
        kwargs={"headers": server.headers},
    )
    reader.start()
    with server.client() as client:
        while not events:
            threading.Event().wait(0.05)
        assert server.engine.call(state).result(TIMEOUT.read)[:2] == (True, True)
        assert client.post("/v1/completions", json=body).status_code == 200
    reader.join(TIMEOUT.read)
    for _ in range(200):  # the route unsubscribes on the engine thread after the stream ends
        if server.engine.call(state).result(TIMEOUT.read) == (False, False, 0):
            break
        threading.Event().wait(0.05)
    assert server.engine.call(state).result(TIMEOUT.read) == (False, False, 0)
    assert server.engine.call(lambda e: e.scheduler.notify).result(TIMEOUT.read) is None
