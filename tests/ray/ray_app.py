"""Helpers for the Ray tests: a real Ray (2 logical CPUs, a 300 MB object store, no
dashboard) and the kvlm Serve application on a free loopback port, which each end-to-end
module starts once and shuts down after it.

The end-to-end modules skip, saying why, only when the `ray` extra is not installed."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import httpx
import pytest

API_KEY = "sk-ray"
MODEL = "smollm2"
NEEDS_RAY = "the 'ray' extra is not installed: pip install -e '.[ray]'"


@dataclass(frozen=True)
class ServeApp:
    url: str

    def replicas(self) -> list[str]:
        """Live replica ids, as the ingress's /health lists them."""
        response = httpx.get(f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["replicas"]

    def wait_for_replicas(self, count: int, timeout: float = 180.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            response = httpx.get(f"{self.url}/health", timeout=10)
            live = response.json().get("replicas", []) if response.status_code == 200 else []
            if len(live) == count:
                return live
            assert time.monotonic() < deadline, f"{count} replicas not live: {response.text}"
            time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(**overrides: object) -> Iterator[ServeApp]:
    """Two replicas of one thread each, small pools (12 MiB: 17 blocks of SmolLM2 float32
    K/V), a 256-token context and the API key; `overrides` replace ServeAppConfig fields, and
    `engine=dict(...)` EngineConfig fields."""
    pytest.importorskip("ray.serve", reason=NEEDS_RAY)
    from kvlm.engine.config import EngineConfig
    from kvlm.ray_serve import local
    from kvlm.ray_serve.config import ServeAppConfig

    engine = EngineConfig(model=MODEL, num_threads=1, kv_cache_memory="12MiB", max_model_len=256)
    engine = replace(engine, **overrides.pop("engine", {}))  # type: ignore[arg-type]
    fields = {"served_model_name": MODEL, "api_key": API_KEY, "num_replicas": 2, **overrides}
    config = ServeAppConfig(engine=engine, **fields)  # type: ignore[arg-type]
    url = local.start(config, "127.0.0.1", _free_port())
    try:
        app = ServeApp(url)
        app.wait_for_replicas(config.num_replicas or 1)
        yield app
    finally:
        local.stop()
