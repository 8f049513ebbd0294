"""Two engine replicas (one thread each) behind the Serve ingress, sharing one real Redis: the
official openai client streams through it, a prefix warmed through replica A is a hit when
replica B serves it (through Redis), routes and errors are kvlm serve's, /metrics and the
cache view show each replica, and a dead Redis only makes replicas recompute."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray_app import API_KEY, MODEL, NEEDS_RAY, ServeApp, serve_app

pytest.importorskip("ray.serve", reason=NEEDS_RAY)
pytestmark = pytest.mark.slow  # a Serve application of two replicas per module: minutes
openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

REPLICA_HEADER = "x-kvlm-replica"
BLOCK_SIZE = 16
PREFIX = list(range(1000, 1150))  # 150 tokens: 9 whole blocks to share
# Two long prompts: the first pushes most of PREFIX out of the 17-block pool, the second the rest
OTHERS = [list(range(3000, 3240)), list(range(5000, 5240))]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def app(redis_server) -> Iterator[ServeApp]:  # noqa: ANN001
    # float weights: the prefix hit's answer is compared with a fresh prefill's, and the
    # int8-activation path turns the two attention kernels' 1e-6 rounding into another token
    engine = {"kv_offload": redis_server.url, "weight_format": "float"}
    with serve_app(engine=engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(app: ServeApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _metrics(app: ServeApp, replica: str, prefix: str, tier: str | None = None) -> dict:
    """The replica's samples whose names start with `prefix` (of one offload tier, if given)."""
    text = httpx.get(f"{app.url}/metrics", timeout=30).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    up = [
        s.value for s in samples if s.name == "kvlm_replica_up" and s.labels == {"replica": replica}
    ]
    assert up == [1.0], f"replica {replica} did not answer the scrape: {up}"
    return {
        s.name: s.value
        for s in samples
        if s.name.startswith(prefix)
        and s.labels.get("replica") == replica
        and s.labels.get("tier") == tier
    }


def test_the_openai_client_streams_what_it_gets_whole(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_prefix_warmed_through_one_replica_is_a_hit_on_the_other(
    app: ServeApp, client: openai.OpenAI
) -> None:
    first, second = app.replicas()

    def complete(prompt: list[int], replica: str):  # noqa: ANN202
        return client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            extra_headers={REPLICA_HEADER: replica},
        )

    warm = complete(PREFIX, first)
    for other in OTHERS:  # evict PREFIX's blocks from the first replica's pool: to Redis
        complete(other, first)
    deadline = time.monotonic() + 30
    while (
        _metrics(app, first, "kvlm_kv_offload_stores", "redis").get(
            "kvlm_kv_offload_stores_total", 0
        )
        < 9 + 14
    ):
        assert time.monotonic() < deadline, _metrics(app, first, "kvlm_kv_offload", "redis")
        time.sleep(0.2)
    before = _metrics(app, second, "kvlm_kv_offload_hits", "redis")
    shared = complete(PREFIX, second)
    after = _metrics(app, second, "kvlm_kv_offload_hits", "redis")
    hit = (len(PREFIX) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert shared.usage.prompt_tokens_details.cached_tokens == hit
    assert shared.choices[0].text == warm.choices[0].text
    gained = after["kvlm_kv_offload_hits_total"] - before.get("kvlm_kv_offload_hits_total", 0)
    assert gained == hit // BLOCK_SIZE


def test_a_repeated_prompt_goes_back_to_the_replica_that_holds_it(app: ServeApp) -> None:
    body = {"model": MODEL, "prompt": list(range(7000, 7100)), "max_tokens": 2}
    served, cached = set(), []
    for _ in range(4):
        r = httpx.post(f"{app.url}/v1/completions", json=body, headers=HEADERS, timeout=120)
        assert r.status_code == 200, r.text
        served.add(r.headers[REPLICA_HEADER])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(served) == 1
    assert cached == [0, 96, 96, 96]  # the pool's hit: 6 whole blocks of the 99 looked up


def test_errors_and_the_api_key_are_the_servers(app: ServeApp) -> None:
    url = f"{app.url}/v1/completions"
    missing = httpx.post(url, json={"model": MODEL, "prompt": "hi"}, timeout=30)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    bad = httpx.post(url, json={"model": MODEL, "prompt": "hi", "n": 0}, headers=HEADERS)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "n"
    too_long = {"model": MODEL, "prompt": list(range(300)), "max_tokens": 1}
    refused = httpx.post(url, json=too_long, headers=HEADERS, timeout=30)
    assert refused.status_code == 400, refused.text
    assert "256" in refused.json()["error"]["message"]
    huge = httpx.post(url, content=b"x" * (9 * 1024 * 1024), headers=HEADERS, timeout=30)
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "request_too_large"
    models = httpx.get(f"{app.url}/v1/models", headers=HEADERS, timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_metrics_and_the_cache_view_are_per_replica(app: ServeApp) -> None:
    replicas = app.replicas()
    text = httpx.get(f"{app.url}/metrics", timeout=30).text
    up = {
        s.labels["replica"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "kvlm_replica_up"
    }
    assert up == dict.fromkeys(replicas, 1.0)
    for replica in replicas:
        assert _metrics(app, replica, "kvlm_kv_cache_blocks_total", None) == {
            "kvlm_kv_cache_blocks_total": 17.0
        }
    with httpx.Client(base_url=app.url, timeout=30) as browser:
        page = browser.get("/cache", params={"replica": replicas[1], "api_key": API_KEY})
        assert page.status_code == 200, page.text
        assert page.headers[REPLICA_HEADER] == replicas[1]
        for _ in range(3):  # the cookie pins the page's look-ups to the same pool
            info = browser.get("/cache/blocks/0/1")
            assert info.headers[REPLICA_HEADER] == replicas[1], info.text
    gone = httpx.get(f"{app.url}/cache", params={"replica": "nosuch", "api_key": API_KEY})
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "no_such_replica"


def test_replicas_keep_serving_when_redis_dies(app: ServeApp, redis_server) -> None:  # noqa: ANN001
    redis_server.process.kill()
    redis_server.process.wait(timeout=10)
    replica = app.replicas()[0]
    body = {"model": MODEL, "prompt": list(range(9000, 9100)), "max_tokens": 4}
    headers = {**HEADERS, REPLICA_HEADER: replica}
    r = httpx.post(f"{app.url}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    failures = _metrics(app, replica, "kvlm_kv_offload_failures", "redis")
    assert failures["kvlm_kv_offload_failures_total"] >= 1
