"""The cache's reuse and waste, measured in-process on one engine (the loop `kvlm serve` drives).

Three workloads:
1. prefix: for each prefix length, TTFT of a request whose long shared prefix is cached vs the
   same request cold;
2. shared-prefix traffic: requests sharing the longest prefix with different questions:
   prefix-cache hit rate (prompt tokens reused / prompt tokens looked up);
3. concurrency: N short streams arrive together, each generates `new_tokens` (EOS ignored,
   greedy); aggregate generated tok/s for each N, without HTTP (`kvlm bench serve` adds it).
KV waste (slots allocated in held blocks but not yet written) is sampled after every step, by
an engine observer.
"""

from __future__ import annotations

import dataclasses
import pydoc_data.topics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from kvlm.bench.common import BenchConfigError, check_threads, resolved_weight_format
from kvlm.bench.machine import MachineInfo, machine_info
from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import LLMEngine
from kvlm.engine.llm import LLM
from kvlm.engine.observers import EngineObserver, StepEvent
from kvlm.engine.request import RequestOutput
from kvlm.kv.block_pool import NULL_BLOCK_ID
from kvlm.sampling import SamplingParams

QUESTIONS = [
    "Summarise the text above in one sentence.",
    "What is the main topic of the text above?",
    "List three keywords from the text above.",
    "Is the text above about Python? Answer yes or no.",
    "Give a title for the text above.",
    "Which statement does the text above describe first?",
    "Name one rule stated in the text above.",
    "Explain the text above to a beginner.",
]


@dataclass(frozen=True)
class PrefixBenchConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    streams: tuple[int, ...] = (1, 4, 16)
    new_tokens: int = 64
    prefix_tokens: tuple[int, ...] = (256, 512, 1000)
    shared_requests: int = 8
    block_size: int = 16
    threads: int | None = None
    weight_format: str = EngineConfig.weight_format

    def __post_init__(self) -> None:
        if not self.streams or min(self.streams) < 1 or self.new_tokens < 1:
            raise BenchConfigError(
                f"streams need values >= 1 and new_tokens >= 1, got {self.streams} and "
                f"{self.new_tokens}"
            )
        if not self.prefix_tokens or min(self.prefix_tokens) < 16:
            raise BenchConfigError(f"prefix_tokens must be >= 16 each, got {self.prefix_tokens}")
        if self.shared_requests < 2:
            raise BenchConfigError(f"shared_requests must be >= 2, got {self.shared_requests}")
        check_threads(self.threads)
        # The engine's own checks (block size, weight format), before any model loads.
        EngineConfig(block_size=self.block_size, weight_format=self.weight_format)
        weight_format = resolved_weight_format(self.weight_format, self.model, self.dtype)
        object.__setattr__(self, "weight_format", weight_format)  # "auto" resolved


@dataclass(eq=False)  # observers are told apart by identity
class WasteMeter(EngineObserver):
    """Slots allocated to the step's requests but not holding K/V after it, summed over steps
    (a request that finished in the step, its blocks freed, is left out).

    Read from the first layer group (full attention for every model kvlm ships).
    """

    block_size: int  # tokens a block holds
    allocated: int = 0
    unused: int = 0

    def on_step(self, event: StepEvent) -> None:
        for scheduled, tables in zip(event.scheduled, event.tables_after, strict=True):
            if scheduled.request.finished:
                continue
            held = sum(block_id != NULL_BLOCK_ID for block_id in tables[0])
            self.allocated += held * self.block_size
            self.unused += held * self.block_size - scheduled.end

    @property
    def fraction(self) -> float:
        return self.unused / self.allocated if self.allocated else 0.0


@dataclass
class StreamsResult:
    num_streams: int
    wall_s: float
    generated_tokens: int
    mean_ttft_s: float

    @property
    def tok_s(self) -> float:
        return self.generated_tokens / self.wall_s


@dataclass
class PrefixTTFT:
    """One prefix length: TTFT of the same request cold and with its prefix cached."""

    prefix_len: int
    ttft_cold_s: float
    ttft_cached_s: float
    cached_tokens: int

    @property
    def speedup(self) -> float:
        return self.ttft_cold_s / self.ttft_cached_s


@dataclass
class PrefixBenchResult:
    config: PrefixBenchConfig
    machine: MachineInfo
    streams: list[StreamsResult] = field(default_factory=list)
    prefixes: list[PrefixTTFT] = field(default_factory=list)
    hit_rate: float = 0.0
    waste_streams: float = 0.0
    waste_shared: float = 0.0


def _run(engine: LLMEngine, waste: WasteMeter) -> dict[str, RequestOutput]:
    """Step until idle; returns the last (delta) output of every request: its metrics are
    final, its text and token ids only the last step's."""
    final = {}
    engine.add_observer(waste)
    try:
        while engine.has_unfinished():
            for output in engine.step():
                if output.finished:
                    final[output.request_id] = output
    finally:
        engine.remove_observer(waste)
    return final


def long_prefix(llm: LLM, num_tokens: int) -> list[int]:
    """`num_tokens` of English from CPython's documentation, through the model's tokenizer."""
    ids: list[int] = []
    for key in sorted(pydoc_data.topics.topics):
        ids += llm.tokenizer.encode(pydoc_data.topics.topics[key], add_special_tokens=False)
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise ValueError(f"CPython's pydoc topics hold fewer than {num_tokens} tokens")


def bench_streams(llm: LLM, num_streams: int, new_tokens: int, waste: WasteMeter) -> StreamsResult:
    engine = llm.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i in range(num_streams):
        engine.add_request(f"Story {i}: on the morning of the festival,", None, params)
    outputs = _run(engine, waste).values()
    wall = time.perf_counter() - start
    ttfts = [o.metrics.ttft_s for o in outputs]
    generated = sum(o.metrics.num_generated_tokens for o in outputs)
    return StreamsResult(num_streams, wall, generated, sum(ttfts) / len(ttfts))


def bench_ttft(llm: LLM, prefix: list[int]) -> PrefixTTFT:
    """TTFT of `prefix` + a question, cold (an empty prefix cache) and then cached."""
    engine = llm.engine
    one_token = SamplingParams(max_tokens=1, temperature=0)
    question = llm.tokenizer.encode("\n\n" + QUESTIONS[0], add_special_tokens=False)
    engine.kv_cache.reset_prefix_cache()
    ttfts, cached = [], 0
    for _ in ("cold", "cached"):
        engine.add_request(None, prefix + question, one_token)
        (output,) = _run(engine, WasteMeter(engine.kv_cache.block_size)).values()
        ttfts.append(output.metrics.ttft_s)
        cached = output.metrics.num_cached_tokens
    return PrefixTTFT(len(prefix), ttfts[0], ttfts[1], cached)


def bench_shared(llm: LLM, prefix: list[int], num_requests: int) -> tuple[float, float]:
    """Requests sharing `prefix`, one after another as a chat product's arrive: returns the
    prefix-cache hit rate and the KV waste over them."""
    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    stats = engine.scheduler_stats
    queries, hits = stats.num_prefix_queries, stats.num_prefix_hits
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    waste = WasteMeter(engine.kv_cache.block_size)
    for i in range(num_requests):
        text = "\n\n" + QUESTIONS[i % len(QUESTIONS)]
        engine.add_request(
            None, prefix + llm.tokenizer.encode(text, add_special_tokens=False), params
        )
        _run(engine, waste)
    hit_rate = (stats.num_prefix_hits - hits) / (stats.num_prefix_queries - queries)
    return hit_rate, waste.fraction


def run_prefix_bench(
    config: PrefixBenchConfig, progress: Callable[[str], None] = lambda line: None
) -> PrefixBenchResult:
    progress(f"loading {config.model} ({config.dtype}, blocks of {config.block_size})")
    llm = LLM(
        model=config.model,
        dtype=config.dtype,
        max_num_seqs=max(config.streams),
        block_size=config.block_size,
        num_threads=config.threads,
        weight_format=config.weight_format,
    )
    result = PrefixBenchResult(config=config, machine=machine_info())
    bench_streams(llm, 1, 8, WasteMeter(config.block_size))  # warm-up
    waste = WasteMeter(config.block_size)
    for n in tqdm(config.streams, desc="concurrent streams", unit="run"):
        r = bench_streams(llm, n, config.new_tokens, waste)
        progress(f"{n} streams: {r.tok_s:.1f} tok/s aggregate, mean TTFT {r.mean_ttft_s:.3f} s")
        result.streams.append(r)
    result.waste_streams = waste.fraction
    for num_tokens in tqdm(config.prefix_tokens, desc="prefix lengths", unit="prefix"):
        r = bench_ttft(llm, long_prefix(llm, num_tokens))
        result.prefixes.append(r)
        progress(
            f"prefix {r.prefix_len} tok: TTFT cold {r.ttft_cold_s:.3f} s, cached "
            f"{r.ttft_cached_s:.3f} s ({r.cached_tokens} tokens reused)"
        )
    longest = long_prefix(llm, max(config.prefix_tokens))
    result.hit_rate, result.waste_shared = bench_shared(llm, longest, config.shared_requests)
    progress(f"{config.shared_requests} requests sharing a prefix: hit rate {result.hit_rate:.1%}")
    llm.engine.kv_cache.check_integrity()
    return result


def markdown(result: PrefixBenchResult) -> str:
    base = result.streams[0].tok_s if result.streams else 0.0
    lines = [
        "| concurrent streams (in-process) | aggregate tok/s | vs 1 stream | mean TTFT s |",
        "|---:|---:|---:|---:|",
    ]
    for r in result.streams:
        lines.append(
            f"| {r.num_streams} | {r.tok_s:.1f} | {r.tok_s / base:.2f}x | {r.mean_ttft_s:.3f} |"
        )
    lines += [
        "",
        "| prefix tokens | TTFT cold s | TTFT cached s | tokens reused | speedup |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in result.prefixes:
        lines.append(
            f"| {p.prefix_len} | {p.ttft_cold_s:.3f} | {p.ttft_cached_s:.3f} | "
            f"{p.cached_tokens} | {p.speedup:.1f}x |"
        )
    c = result.config
    lines += [
        "",
        "| measure | value |",
        "|---|---:|",
        f"| prefix-cache hit rate, {c.shared_requests} requests sharing "
        f"{max(c.prefix_tokens)} tokens | {result.hit_rate:.1%} |",
        f"| KV waste (allocated, unwritten slots), concurrency runs | {result.waste_streams:.2%} |",
        f"| KV waste, shared-prefix requests | {result.waste_shared:.2%} |",
    ]
    m = result.machine
    lines.append(
        f"\nBlocks of {c.block_size} tokens. "
        f"Machine: {m.cpu_model}, {m.cpu_count} CPUs, torch {m.torch_version}, "
        f"{m.torch_num_threads} threads, load average {m.load_average}, {m.date}."
    )
    return "\n".join(lines)


def to_json(result: PrefixBenchResult) -> dict[str, Any]:
    return {
        "benchmark": "prefix",
        "config": dataclasses.asdict(result.config),
        "machine": dataclasses.asdict(result.machine),
        "streams": [{**dataclasses.asdict(s), "tok_s": s.tok_s} for s in result.streams],
        "prefixes": [{**dataclasses.asdict(p), "speedup": p.speedup} for p in result.prefixes],
        "hit_rate": result.hit_rate,
        "waste_streams": result.waste_streams,
        "waste_shared": result.waste_shared,
    }
