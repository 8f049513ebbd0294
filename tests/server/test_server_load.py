"""Many clients at once, some of them leaving early: no server error, every remaining stream
completes, and afterwards no request runs and no block is held (the pool's invariants hold).
Then /metrics moves by exactly the traffic a test sends, preemptions included."""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import pytest
from live_server import MODEL_NAME, LiveServer

from kvlm.engine.config import EngineConfig

NUM_CLIENTS = 32
MAX_TOKENS = 16
OVERALL_TIMEOUT_S = 150.0
BLOCK_SIZE = EngineConfig.block_size  # the `server` fixture's


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


def _complete(server: LiveServer, body: dict) -> dict:
    with server.client() as client:
        response = client.post("/v1/completions", json={"model": MODEL_NAME, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def test_metrics_count_exactly_the_traffic_sent(server: LiveServer) -> None:
    """Three requests of 5 tokens, one after another, under a salt of this test's own, the
    third repeating the first: every counter moves by exactly what they did."""
    before = server.wait_idle()
    assert before["kvlm_num_requests_running"] == before["kvlm_num_requests_waiting"] == 0
    salt = f"metrics-{uuid.uuid4()}"  # no earlier test's blocks can be hit
    prompt = "The metrics test counts every token of this prompt, which is long enough to fill "
    prompt += "two blocks of sixteen tokens and then some more words, so that a repeat of it "
    prompt += "finds its first two blocks in the prefix cache"
    bodies = [
        {"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True},
        {"prompt": "Another prompt", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
        {"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True},
    ]
    usages = [_complete(server, {**b, "cache_salt": salt})["usage"] for b in bodies]
    m = server.wait_idle()
    d = _deltas(before, m)

    prompt_tokens = [u["prompt_tokens"] for u in usages]
    assert prompt_tokens[0] > 2 * BLOCK_SIZE and prompt_tokens[2] == prompt_tokens[0]
    assert [u["completion_tokens"] for u in usages] == [5, 5, 5]
    assert d["kvlm_prompt_tokens_total"] == sum(prompt_tokens)
    assert d["kvlm_generation_tokens_total"] == 15
    assert d["kvlm_prefix_cache_queries_total"] == sum(prompt_tokens)
    # Only the repeat hits: its full blocks, short of the last token (computed for its logits).
    assert d["kvlm_prefix_cache_hits_total"] == (prompt_tokens[0] - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert d["kvlm_num_preemptions_total"] == 0  # one request at a time never runs out
    assert d["kvlm_request_success_total[finish_reason=length]"] == 3
    for histogram in ("kvlm_time_to_first_token_seconds", "kvlm_e2e_request_latency_seconds"):
        assert d[f"{histogram}_count"] == 3
        assert d[f"{histogram}_sum"] > 0
    assert d["kvlm_inter_token_latency_seconds_count"] == 3 * 4  # every token after the first
    for histogram in (
        "kvlm_time_to_first_token_seconds",
        "kvlm_inter_token_latency_seconds",
        "kvlm_e2e_request_latency_seconds",
    ):
        assert m[f"{histogram}_bucket[le=+Inf]"] == m[f"{histogram}_count"]
    assert m["kvlm_num_requests_running"] == m["kvlm_num_requests_waiting"] == 0
    assert m["kvlm_kv_cache_blocks_used"] == 0
    assert m["kvlm_kv_cache_usage_ratio"] == 0  # nothing held: finished blocks are free
    assert m["kvlm_kv_cache_blocks_total"] > 0
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "# TYPE kvlm_kv_cache_usage_ratio gauge" in text
    assert re.search(r"# TYPE kvlm_prefix_cache_hits(_total)? counter", text)
    assert "# TYPE kvlm_time_to_first_token_seconds histogram" in text


def test_a_request_that_does_not_fit_beside_another_is_preempted_once(
    small_kv_server: LiveServer,
) -> None:
    """Two 40-token generations whose blocks cannot all fit at once: the second starts while
    the first is streaming, is preempted (exactly once: the first only grows until it ends),
    then recomputed with its tokens kept, and ends as it would alone."""
    server = small_kv_server
    before = server.wait_idle()
    num_blocks = int(before["kvlm_kv_cache_blocks_total"])
    first = {"prompt": "Count: one, two,", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    second = {**first, "prompt": "The alphabet: a, b,"}
    result: dict = {}
    with server.client() as client:
        body = {"model": MODEL_NAME, "stream": True, **first}
        with client.stream("POST", "/v1/completions", json=body) as stream:
            lines = (line for line in stream.iter_lines() if line)
            next(lines)  # the first token: the first request is decoding
            thread = threading.Thread(target=lambda: result.update(_complete(server, second)))
            thread.start()
            events = [*lines]
        thread.join(OVERALL_TIMEOUT_S)
    assert events[-1] == "data: [DONE]" and _finish_reason(events[-2]) == "length"
    usage = result["usage"]
    assert usage["completion_tokens"] == 40 and result["choices"][0]["finish_reason"] == "length"
    need = usage["prompt_tokens"] + 40  # tokens of each request at its end (blocks of 4)
    # Each alone fits; together they overflow even when the second runs 16 tokens behind.
    assert -(-need // 4) <= num_blocks and 4 * num_blocks < 2 * need - 16

    after = server.wait_idle()
    d = _deltas(before, after)
    assert d["kvlm_num_preemptions_total"] == 1
    assert d["kvlm_generation_tokens_total"] == 80  # recomputing generated nothing twice
    assert after["kvlm_kv_cache_blocks_used"] == 0 and after["kvlm_kv_cache_usage_ratio"] == 0
    server.check_integrity()
    alone = _complete(server, second)
    assert result["choices"][0]["text"] == alone["choices"][0]["text"]
    assert server.wait_idle()["kvlm_num_preemptions_total"] == after["kvlm_num_preemptions_total"]
