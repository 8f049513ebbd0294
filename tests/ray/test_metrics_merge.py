"""The ingress's /metrics: each replica's families merged, every sample labelled by replica,
and a replica that did not answer reported down."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvlm.ray_serve.metrics import merge_replica_metrics

PAGE = """# HELP kvlm_prefix_cache_hits_total Prompt tokens reused.
# TYPE kvlm_prefix_cache_hits_total counter
kvlm_prefix_cache_hits_total{model_name="m"} %d
# HELP kvlm_time_to_first_token_seconds TTFT.
# TYPE kvlm_time_to_first_token_seconds histogram
kvlm_time_to_first_token_seconds_bucket{le="0.1",model_name="m"} %d
kvlm_time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} %d
kvlm_time_to_first_token_seconds_count{model_name="m"} %d
kvlm_time_to_first_token_seconds_sum{model_name="m"} 0.5
"""


def test_samples_are_labelled_by_replica() -> None:
    page = merge_replica_metrics({"b": PAGE % (7, 1, 2, 2), "a": PAGE % (3, 0, 1, 1), "c": None})
    families = {f.name: f for f in text_string_to_metric_families(page.decode())}
    hits = {s.labels["replica"]: s.value for s in families["kvlm_prefix_cache_hits"].samples}
    assert hits == {"a": 3.0, "b": 7.0}
    assert families["kvlm_prefix_cache_hits"].type == "counter"
    ttft = families["kvlm_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    counts = {s.labels["replica"]: s.value for s in ttft.samples if s.name.endswith("_count")}
    assert counts == {"a": 1.0, "b": 2.0}
    up = {s.labels["replica"]: s.value for s in families["kvlm_replica_up"].samples}
    assert up == {"a": 1.0, "b": 1.0, "c": 0.0}
