"""Prefix-cache facts over HTTP: `usage.prompt_tokens_details.cached_tokens`, `cache_salt`
isolation, and the prefix counters of /metrics."""

from __future__ import annotations

import uuid

import httpx
import pytest
from live_server import MODEL_NAME, LiveServer

BLOCK_SIZE = 16  # EngineConfig's default


@pytest.fixture(scope="module")
def http(server: LiveServer) -> httpx.Client:
    with server.client() as client:
        yield client


def _long_prompt() -> str:
    """~100 tokens no earlier test sent (so nothing of it is cached yet)."""
    return f"Request {uuid.uuid4().hex}. " + "The quick brown fox jumps over the lazy dog. " * 8


def _cached(
    http: httpx.Client, prompt: str | list[int], salt: str | None = None, chat: bool = False
) -> tuple[int, int]:
    """(cached_tokens, prompt_tokens) of one short request."""
    body: dict = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        response = http.post("/v1/chat/completions", json=body)
    else:
        body["prompt"] = prompt
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]


def test_repeated_prompt_reuses_full_blocks(http: httpx.Client, server: LiveServer) -> None:
    before = server.metrics()
    prompt = _long_prompt()
    cached, num_prompt = _cached(http, prompt)
    assert cached == 0
    cached, _ = _cached(http, prompt)
    assert cached == (num_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE > 0  # the last token is computed
    after = server.metrics()
    queries = after["kvlm_prefix_cache_queries_total"] - before["kvlm_prefix_cache_queries_total"]
    hits = after["kvlm_prefix_cache_hits_total"] - before["kvlm_prefix_cache_hits_total"]
    assert queries == 2 * num_prompt
    assert hits == cached


def test_repeated_chat_reuses_the_conversation(http: httpx.Client) -> None:
    prompt = _long_prompt()
    first, num_prompt = _cached(http, prompt, chat=True)
    assert first < BLOCK_SIZE * 3  # at most the template's system prompt, shared by all chats
    second, _ = _cached(http, prompt, chat=True)
    assert second == (num_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE > first


def test_cache_salt_isolates_prefixes(http: httpx.Client) -> None:
    prompt = _long_prompt()
    assert _cached(http, prompt, salt="tenant-a")[0] == 0
    assert _cached(http, prompt, salt="tenant-a")[0] > 0  # same salt: shared
    assert _cached(http, prompt, salt="tenant-b")[0] == 0  # another salt: nothing shared
    assert _cached(http, prompt)[0] == 0  # no salt: nothing shared either
    assert _cached(http, prompt, salt="tenant-b")[0] > 0


def test_salts_and_tokens_shifting_a_digit_share_nothing(http: httpx.Client) -> None:
    """Salt "tenant-1" + [12, 3, ...] and salt "tenant-11" + [2, 3, ...] once had one name
    (salt and token digits hashed back to back): the second tenant was served the first's K/V."""
    rest = [int(d, 16) + 100 for d in uuid.uuid4().hex] * 3  # 96 tokens no other test sent
    assert _cached(http, [12, *rest], salt="tenant-1")[0] == 0
    assert _cached(http, [12, *rest], salt="tenant-1")[0] > 0  # its own prefix: a hit
    assert _cached(http, [2, *rest], salt="tenant-11")[0] == 0
    assert _cached(http, [12, 3, *rest])[0] == 0  # no salt: "1" moved into the first token
    assert _cached(http, [2, 3, *rest], salt="1")[0] == 0


def test_usage_reports_the_requests_kv_peak(http: httpx.Client, server: LiveServer) -> None:
    body = {"model": MODEL_NAME, "prompt": _long_prompt(), "max_tokens": 5, "temperature": 0}
    usage = http.post("/v1/completions", json=body).json()["usage"]
    (spec,) = server.engine.engine.kv_specs
    # the last step computes token prompt + 4 (the fifth output is sampled, never fed back)
    num_tokens = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert usage["kv_peak_bytes"] == -(-num_tokens // BLOCK_SIZE) * spec.page_nbytes
    totals = {k: v for k, v in server.metrics().items() if "group_bytes_total" in k}
    assert list(totals) == ["kvlm_kv_cache_group_bytes_total[group=30 layers, full, float32]"]
