"""The ingress's `/metrics`: every engine replica's `/metrics`, each sample labelled with its
replica id, as one Prometheus page, plus `kvlm_replica_up` (1 if its scrape answered)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

REPLICA_LABEL = "replica"


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_replica_metrics(scrapes: Mapping[str, str | None]) -> bytes:
    """`scrapes`: replica id -> its /metrics text (None: it did not answer). A family keeps
    its name, type and help; its samples are every replica's, told apart by `replica`."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "kvlm_replica_up",
        "1 if the engine replica answered this scrape, else 0.",
        labels=[REPLICA_LABEL],
    )
    for replica_id, text in sorted(scrapes.items()):
        up.add_metric([replica_id], 0 if text is None else 1)
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for s in family.samples:
                labels = {**s.labels, REPLICA_LABEL: replica_id}
                merged.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
    registry = CollectorRegistry()
    registry.register(_Families([*families.values(), up]))
    return generate_latest(registry)
