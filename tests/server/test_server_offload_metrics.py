"""/metrics carries one counter per offload tier and field, read from the engine's snapshot."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from kvlm.engine.async_engine import EngineStats
from kvlm.kv.offload.tier import TierSnapshot
from kvlm.server.metrics import ServerMetrics


@dataclass
class SnapshotOnly:
    """What the metrics read of an engine: its latest stats."""

    snapshot: EngineStats

    def stats(self) -> EngineStats:
        return self.snapshot


def test_offload_counters_per_tier() -> None:
    tiers = (
        TierSnapshot("ram", hits=5, misses=1, stores=9, bytes_held=1000, load_seconds=0.5),
        TierSnapshot("redis", hits=2, failures=3, bytes_loaded=4096),
    )
    stats = EngineStats(kv_offload=tiers, num_offload_dropped_writes=7)
    metrics = ServerMetrics(SnapshotOnly(stats), "m")  # type: ignore[arg-type]
    samples = {
        (s.name, s.labels.get("tier")): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name.startswith("kvlm_kv_offload")
    }
    assert samples[("kvlm_kv_offload_hits_total", "ram")] == 5
    assert samples[("kvlm_kv_offload_misses_total", "ram")] == 1
    assert samples[("kvlm_kv_offload_stores_total", "ram")] == 9
    assert samples[("kvlm_kv_offload_load_seconds_total", "ram")] == 0.5
    assert samples[("kvlm_kv_offload_failures_total", "redis")] == 3
    assert samples[("kvlm_kv_offload_bytes_loaded_total", "redis")] == 4096
    assert samples[("kvlm_kv_offload_bytes_held", "ram")] == 1000
    assert ("kvlm_kv_offload_bytes_held", "redis") not in samples  # Redis's size is its own
    assert samples[("kvlm_kv_offload_dropped_writes_total", None)] == 7
