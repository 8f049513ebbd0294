"""A replica killed during 16 concurrent streams: every stream completes or ends with an error
event within 5 s of the kill, the next 16 requests all succeed, and Serve replaces the
replica."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from ray_app import API_KEY, MODEL, NEEDS_RAY, ServeApp, serve_app

ray = pytest.importorskip("ray", reason=NEEDS_RAY)
pytest.importorskip("ray.serve", reason=NEEDS_RAY)
pytestmark = pytest.mark.slow  # a Serve application of two replicas per module: minutes

NUM_STREAMS = 16
MAX_TOKENS = 700  # streams outlive the kill by seconds (checked: none has ended by then)
ENDED_WITHIN_S = 5.0
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Stream:
    replica: str = ""
    num_chunks: int = 0
    error: dict | None = None
    finish_reason: str | None = None
    done_at: float | None = None  # when data: [DONE] arrived
    events: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def app() -> Iterator[ServeApp]:
    # Room for 8 streams of MAX_TOKENS per replica: 256 MiB of float32 K/V is 5,825 tokens.
    engine = {"max_num_seqs": NUM_STREAMS, "max_model_len": 1024, "kv_cache_memory": "256MiB"}
    with serve_app(engine=engine) as running:
        yield running


async def _stream(client: httpx.AsyncClient, i: int, record: Stream) -> None:
    body = {
        "model": MODEL,
        "prompt": f"Story number {i}: once upon a time",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    async with client.stream("POST", "/v1/completions", json=body, headers=HEADERS) as r:
        assert r.status_code == 200
        record.replica = r.headers["x-kvlm-replica"]
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            record.events.append(payload)
            if payload == "[DONE]":
                record.done_at = time.monotonic()
                return
            event = json.loads(payload)
            if "error" in event:
                record.error = event["error"]
            else:
                record.num_chunks += 1
                record.finish_reason = event["choices"][0]["finish_reason"]


def _kill(replica: str) -> None:
    from kvlm.ray_serve.config import APP_NAME, ENGINE_DEPLOYMENT

    name = f"SERVE_REPLICA::{APP_NAME}#{ENGINE_DEPLOYMENT}#{replica}"
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


async def _kill_during_streams(app: ServeApp) -> tuple[list[Stream], str, float]:
    records = [Stream() for _ in range(NUM_STREAMS)]
    async with httpx.AsyncClient(base_url=app.url, timeout=120) as client:
        tasks = [asyncio.create_task(_stream(client, i, r)) for i, r in enumerate(records)]
        deadline = time.monotonic() + 120
        while not all(r.num_chunks >= 2 for r in records):
            assert time.monotonic() < deadline, [r.num_chunks for r in records]
            await asyncio.sleep(0.05)
        victim = records[0].replica
        _kill(victim)
        killed_at = time.monotonic()
        assert not any(r.done_at for r in records), "a stream ended before the kill"
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return records, victim, killed_at


def test_a_replica_killed_mid_stream(app: ServeApp) -> None:
    before = set(app.replicas())
    records, victim, killed_at = asyncio.run(_kill_during_streams(app))
    on_victim = [r for r in records if r.replica == victim]
    survivors = [r for r in records if r.replica != victim]
    assert on_victim and survivors, [r.replica for r in records]
    for r in on_victim:  # cut short with a clear error, quickly
        assert r.done_at is not None and r.done_at - killed_at < ENDED_WITHIN_S, r.events[-3:]
        assert r.error is not None and r.error["code"] == "replica_lost", r.events[-3:]
        assert victim in r.error["message"]
    for r in survivors:  # nothing else lost
        assert r.error is None, r.error
        assert r.finish_reason == "length" and r.done_at is not None

    async def next_requests() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=app.url, timeout=120) as client:
            body = {"model": MODEL, "prompt": "The next request", "max_tokens": 4}
            calls = (client.post("/v1/completions", json=body, headers=HEADERS) for _ in range(16))
            return await asyncio.gather(*calls)

    responses = asyncio.run(next_requests())
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses]
    assert {r.headers["x-kvlm-replica"] for r in responses} <= before - {victim} | set(
        app.replicas()
    )

    from ray import serve

    from kvlm.ray_serve.config import APP_NAME, ENGINE_DEPLOYMENT

    deadline = time.monotonic() + 240
    while True:  # Serve starts a replacement, which loads its model and joins
        live = set(app.replicas())
        deployment = serve.status().applications[APP_NAME].deployments[ENGINE_DEPLOYMENT]
        if len(live) == 2 and victim not in live and deployment.status == "HEALTHY":
            break
        assert time.monotonic() < deadline, (live, deployment)
        time.sleep(1)
    assert len(live - before) == 1
