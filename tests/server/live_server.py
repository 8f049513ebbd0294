"""A live kvlm server for tests: the handle tests get, and how to start one."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvlm.engine.async_engine import AsyncLLMEngine

API_KEY = "sk-kvlm-test"
MODEL_NAME = "smollm2"
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class LogCollector(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class LiveServer:
    url: str
    engine: AsyncLLMEngine
    errors: list[logging.LogRecord] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=TIMEOUT)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (the model_name label dropped; one model)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
                key = sample.name + "".join(f"[{k}={v}]" for k, v in sorted(labels.items()))
                samples[key] = sample.value
        return samples

    def wait_idle(self, timeout: float = 15.0) -> dict[str, float]:
        """Poll /metrics until nothing runs, waits or holds a block; returns the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (
                m["kvlm_num_requests_running"] == 0
                and m["kvlm_num_requests_waiting"] == 0
                and m["kvlm_kv_cache_blocks_used"] == 0
            )
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def check_integrity(self) -> None:
        """Run the block manager's invariant check on the engine thread, between steps."""
        self.engine.call(lambda e: e.kv_cache.check_integrity()).result(timeout=10)
