"""Two `kvlm serve` processes sharing one real Redis: a prefix one server computed (and evicted
from its pool) is a prefix hit in the other, with the same tokens, counted in /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "sk-offload"
BLOCK_SIZE = 16
PREFIX = list(range(1000, 1150))  # 150 tokens: 9 whole blocks to share
# Two long prompts: the first pushes most of PREFIX out of the 17-block pool, the second the rest
OTHERS = [list(range(3000, 3240)), list(range(5000, 5240))]


@contextmanager
def kvlm_serve(redis_url: str) -> Iterator[str]:
    """A `kvlm serve` subprocess on a free port with a small pool and the Redis tier."""
    args = [
        *(sys.executable, "-m", "kvlm.cli.main", "serve", "--port", "0", "--threads", "1"),
        *("--api-key", API_KEY, "--kv-cache-memory", "12MiB", "--max-model-len", "256"),
        *("--kv-offload", redis_url, "--log-level", "warning"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("kvlm: serving"):
                url = line.split(" at ", 1)[1].split("/v1", 1)[0]
        assert url is not None, f"kvlm serve did not start (exit {proc.poll()})"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _complete(url: str, prompt: list[int]) -> dict:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 4, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _redis_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("kvlm_kv_offload") and sample.labels.get("tier") == "redis"
    }


@pytest.mark.slow
def test_a_prefix_warmed_by_one_server_hits_in_another(redis_server) -> None:  # noqa: ANN001
    with kvlm_serve(redis_server.url) as first:
        warm = _complete(first, PREFIX)
        for other in OTHERS:  # evict PREFIX's blocks: they go to Redis
            _complete(first, other)
        deadline = time.monotonic() + 30
        while _redis_counters(first).get("kvlm_kv_offload_stores_total", 0) < 9 + 14:
            assert time.monotonic() < deadline, _redis_counters(first)
            time.sleep(0.2)
    with kvlm_serve(redis_server.url) as second:
        shared = _complete(second, PREFIX)
        counters = _redis_counters(second)
    hit = (len(PREFIX) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert shared["usage"]["prompt_tokens_details"]["cached_tokens"] == hit
    assert shared["choices"][0]["text"] == warm["choices"][0]["text"]
    assert counters["kvlm_kv_offload_hits_total"] == hit // BLOCK_SIZE
    assert counters["kvlm_kv_offload_failures_total"] == 0
