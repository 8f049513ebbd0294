"""Many clients at once, some of them leaving early: no server error, every remaining stream
completes, and afterwards no request runs and no block is held (the pool's invariants hold).
Then /metrics shows every metric with values that fit the traffic."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from live_server import MODEL_NAME, LiveServer

NUM_CLIENTS = 32
MAX_TOKENS = 16
OVERALL_TIMEOUT_S = 150.0


@dataclass
class ClientResult:
    leaves_after: int | None  # chunks read before disconnecting; None = reads to the end
    status: int | None = None
    events: list[str] = field(default_factory=list)
    error: str | None = None


def _stream(server: LiveServer, index: int, result: ClientResult) -> None:
    body = {
        "model": MODEL_NAME,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.8,
        "seed": index,
        "ignore_eos": True,
        "stream": True,
    }
    if index % 2:
        body["messages"] = [{"role": "user", "content": f"Tell me about the number {index}."}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = f"Client {index} says: the number {index} is"
        path = "/v1/completions"
    try:
        # One client (one connection) each: closing it mid-stream is a real disconnect.
        with server.client() as client, client.stream("POST", path, json=body) as response:
            result.status = response.status_code
            for line in response.iter_lines():
                if not line:
                    continue
                result.events.append(line)
                if result.leaves_after is not None and len(result.events) >= result.leaves_after:
                    return  # leaving the `with` closes the connection mid-stream
    except httpx.HTTPError as e:
        result.error = repr(e)


def _finish_reason(event: str) -> str | None:
    return json.loads(event.removeprefix("data: "))["choices"][0]["finish_reason"]


def test_concurrent_streams_with_disconnects_leak_nothing(server: LiveServer) -> None:
    rng = random.Random(0)
    leavers = set(rng.sample(range(NUM_CLIENTS), NUM_CLIENTS // 3))
    results = [ClientResult(rng.choice([1, 2]) if i in leavers else None) for i in range(32)]
    num_errors = len(server.errors)
    before = server.metrics()

    threads = [
        threading.Thread(target=_stream, args=(server, i, r), daemon=True)
        for i, r in enumerate(results)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + OVERALL_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "clients still streaming after the timeout"

    for i, result in enumerate(results):
        assert result.error is None, f"client {i}: {result.error}"
        assert result.status == 200, f"client {i}: HTTP {result.status}"
        if result.leaves_after is None:
            assert result.events[-1] == "data: [DONE]", f"client {i}: {result.events[-2:]}"
            assert _finish_reason(result.events[-2]) == "length"
            assert all(_finish_reason(e) is None for e in result.events[:-2])
    assert server.errors[num_errors:] == [], [r.getMessage() for r in server.errors[num_errors:]]

    after = server.wait_idle()
    assert after["kvlm_num_requests_running"] == 0
    assert after["kvlm_num_requests_waiting"] == 0
    assert after["kvlm_kv_cache_blocks_used"] == 0
    assert after["kvlm_kv_cache_usage_ratio"] == 0
    server.check_integrity()
    generated = after["kvlm_generation_tokens_total"] - before["kvlm_generation_tokens_total"]
    num_stayers = NUM_CLIENTS - len(leavers)
    # The leavers were aborted well before their 16 tokens.
    assert num_stayers * MAX_TOKENS <= generated < NUM_CLIENTS * MAX_TOKENS


def test_non_streaming_client_that_leaves_is_aborted(server: LiveServer) -> None:
    before = server.metrics()
    body = {"model": MODEL_NAME, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True}
    timeout = httpx.Timeout(1.0, connect=5.0)
    client = httpx.Client(base_url=server.url, headers=server.headers, timeout=timeout)
    with client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json=body)
    after = server.wait_idle(timeout=10)
    assert after["kvlm_num_requests_running"] == 0
    assert after["kvlm_kv_cache_blocks_used"] == 0
    generated = after["kvlm_generation_tokens_total"] - before["kvlm_generation_tokens_total"]
    assert generated < 400
    server.check_integrity()


def test_metrics_after_traffic(server: LiveServer) -> None:
    m = server.wait_idle()
    for gauge in ("kvlm_num_requests_running", "kvlm_num_requests_waiting"):
        assert m[gauge] == 0
    assert m["kvlm_kv_cache_blocks_used"] == 0
    assert 0 <= m["kvlm_kv_cache_usage_ratio"] <= 1
    assert m["kvlm_kv_cache_blocks_total"] > 0
    assert m["kvlm_prompt_tokens_total"] > 0
    assert m["kvlm_generation_tokens_total"] >= NUM_CLIENTS // 2 * MAX_TOKENS
    assert 0 <= m["kvlm_prefix_cache_hits_total"] <= m["kvlm_prefix_cache_queries_total"]
    assert m["kvlm_prefix_cache_queries_total"] > 0
    assert m["kvlm_num_preemptions_total"] >= 0
    for histogram in (
        "kvlm_time_to_first_token_seconds",
        "kvlm_inter_token_latency_seconds",
        "kvlm_e2e_request_latency_seconds",
    ):
        assert m[f"{histogram}_count"] > 0
        assert m[f"{histogram}_sum"] > 0
        assert m[f"{histogram}_bucket[le=+Inf]"] == m[f"{histogram}_count"]
    # Every token after a request's first is one inter-token interval.
    assert m["kvlm_inter_token_latency_seconds_count"] < m["kvlm_generation_tokens_total"]
    assert m["kvlm_request_success_total[finish_reason=length]"] > 0
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "# TYPE kvlm_kv_cache_usage_ratio gauge" in text
    assert re.search(r"# TYPE kvlm_prefix_cache_hits(_total)? counter", text)
    assert "# TYPE kvlm_time_to_first_token_seconds histogram" in text
