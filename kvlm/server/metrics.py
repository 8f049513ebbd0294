"""Prometheus metrics on a dedicated registry: engine state read at scrape time, latencies
observed per request by the routes.

Engine gauges and counters come from `AsyncLLMEngine.stats()` (a snapshot the engine thread
takes after each step), so a scrape never touches the engine itself. Token counters count
tokens, not requests: `kvlm_prefix_cache_hits_total / kvlm_prefix_cache_queries_total` is the
prefix-cache hit rate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvlm.engine.async_engine import AsyncLLMEngine, EngineStats
from kvlm.kv.offload.tier import TierSnapshot

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class EngineCollector(Collector):
    """Gauges and counters read from the engine's latest stats snapshot."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        gauges = [
            ("kvlm_num_requests_running", "Requests in the running batch.", s.num_running),
            ("kvlm_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            (
                "kvlm_kv_cache_usage_ratio",
                "Fraction of KV blocks held by a request (0..1).",
                s.kv_cache_usage,
            ),
            ("kvlm_kv_cache_blocks_used", "KV blocks held by a request.", s.num_blocks_used),
            ("kvlm_kv_cache_blocks_total", "KV blocks in the pool.", s.num_blocks),
        ]
        counters = [
            (
                "kvlm_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.num_prefix_queries,
            ),
            (
                "kvlm_prefix_cache_hits",
                "Prompt tokens whose K/V were reused from the prefix cache.",
                s.num_prefix_hits,
            ),
            ("kvlm_num_preemptions", "Requests preempted to free KV blocks.", s.num_preemptions),
            ("kvlm_prompt_tokens", "Prompt tokens of accepted requests.", s.num_prompt_tokens),
            ("kvlm_generation_tokens", "Tokens generated.", s.num_generation_tokens),
            ("kvlm_engine_step_errors", "Engine steps that raised.", s.num_step_errors),
        ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        for name, doc, index in (
            ("kvlm_kv_cache_group_bytes_used", "KV bytes held, per layer group.", 1),
            ("kvlm_kv_cache_group_bytes_total", "KV bytes in the pool, per layer group.", 2),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name", "group"])
            for group in s.kv_groups:
                gauge.add_metric([self.model_name, group[0]], group[index])
            yield gauge
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
        yield from self._speculative(s)
        yield from self._offload(s.kv_offload)
        if s.kv_offload:
            dropped = CounterMetricFamily(
                "kvlm_kv_offload_dropped_writes",
                "Evicted blocks not offloaded because too many writes were already queued.",
                labels=["model_name"],
            )
            dropped.add_metric([self.model_name], s.num_offload_dropped_writes)
            yield dropped

    def _speculative(self, s: EngineStats) -> Iterator[Metric]:
        """Speculative decoding's counters (as vLLM's spec_decode_*), acceptance rate and
        mean tokens per sampling step; nothing when speculation is off."""
        spec = s.speculative
        if spec is None:
            return
        counters = [
            ("drafts", "Request steps that verified draft tokens.", spec.num_drafts),
            ("draft_tokens", "Draft tokens proposed and verified.", spec.num_draft_tokens),
            (
                "accepted_tokens",
                "Draft tokens the target model accepted.",
                spec.num_accepted_tokens,
            ),
        ]
        for field, doc, value in counters:
            counter = CounterMetricFamily(
                f"kvlm_spec_decode_num_{field}", doc, labels=["model_name"]
            )
            counter.add_metric([self.model_name], value)
            yield counter
        gauges = [
            (
                "acceptance_ratio",
                "Accepted / proposed draft tokens since start.",
                spec.acceptance_rate,
            ),
            (
                "mean_tokens_per_step",
                "Tokens a request gains per sampling step (1 without accepted drafts).",
                spec.mean_tokens_per_step,
            ),
        ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(f"kvlm_spec_decode_{name}", doc, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge

    def _offload(self, tiers: tuple[TierSnapshot, ...]) -> Iterator[Metric]:
        """Per offload tier: blocks hit, missed, stored, failed operations, bytes, load time."""
        counters = [
            ("hits", "Blocks found in the tier when a prefix was looked up."),
            ("misses", "Blocks looked up in the tier and not found (or skipped: tier down)."),
            ("stores", "Evicted blocks written to the tier."),
            ("failures", "Tier operations that failed (I/O error, timeout, damaged block)."),
            ("bytes_stored", "Bytes of blocks written to the tier."),
            ("bytes_loaded", "Bytes of blocks read back from the tier."),
            ("load_seconds", "Seconds spent looking blocks up in the tier."),
        ]
        labels = ["model_name", "tier"]
        for field, doc in counters:
            counter = CounterMetricFamily(f"kvlm_kv_offload_{field}", doc, labels=labels)
            for tier in tiers:
                counter.add_metric([self.model_name, tier.name], getattr(tier, field))
            yield counter
        gauge = GaugeMetricFamily(
            "kvlm_kv_offload_bytes_held", "Bytes the tier holds now (RAM, disk).", labels=labels
        )
        for tier in tiers:
            if tier.bytes_held is not None:
                gauge.add_metric([self.model_name, tier.name], tier.bytes_held)
        yield gauge


class ServerMetrics:
    """The registry behind `GET /metrics`, and the per-request latency histograms."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        labels = {"labelnames": ["model_name"], "registry": self.registry}
        self.ttft = Histogram(
            "kvlm_time_to_first_token_seconds",
            "From receiving a request to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            **labels,
        ).labels(model_name)
        self.itl = Histogram(
            "kvlm_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
            buckets=_LATENCY_BUCKETS,
            **labels,
        ).labels(model_name)
        self.e2e = Histogram(
            "kvlm_e2e_request_latency_seconds",
            "From receiving a request to its last token.",
            buckets=_E2E_BUCKETS,
            **labels,
        ).labels(model_name)
        self.finished = Counter(
            "kvlm_request_success",
            "Requests that finished, by finish reason.",
            labelnames=["model_name", "finish_reason"],
            registry=self.registry,
        )
        self.model_name = model_name

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's latencies as its outputs arrive, as the client sees them."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: float | None = None  # when the latest new token arrived
        self.num_tokens = 0

    def sibling(self) -> RequestTimer:
        """A timer for another choice of the same request: the same arrival, its own tokens."""
        twin = RequestTimer(self.metrics)
        twin.start = self.start
        return twin

    def on_output(self, num_new_tokens: int, finish_reason: str | None) -> None:
        """An output (a delta) arrived carrying `num_new_tokens` tokens."""
        t = time.perf_counter()
        if num_new_tokens > 0:
            if self.last is None:
                self.metrics.ttft.observe(t - self.start)
            else:
                self.metrics.itl.observe(t - self.last)
            self.last = t
            self.num_tokens += num_new_tokens
        if finish_reason is not None:
            self.metrics.e2e.observe(t - self.start)
            self.metrics.finished.labels(self.metrics.model_name, finish_reason).inc()
