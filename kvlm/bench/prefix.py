"""The serving benchmark: what continuous batching and prefix caching buy, measured in-process.

Three workloads on one engine (the same loop `kvlm serve` drives):
1. concurrency: N streams arrive together, each generates `new_tokens` (EOS ignored, greedy);
   aggregate generated tok/s for each N;
2. prefix: TTFT of a request whose long shared prefix is cached vs the same request cold;
3. shared-prefix traffic: requests sharing that prefix with different questions: prefix-cache
   hit rate (prompt tokens reused / prompt tokens looked up).
KV waste (slots allocated in held blocks but not yet written) is sampled after every step.
"""

from __future__ import annotations

import pydoc_data.topics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvlm.bench.machine import MachineInfo, machine_info
from kvlm.engine.engine import LLMEngine
from kvlm.engine.llm import LLM
from kvlm.engine.request import RequestOutput
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
class ServeBenchConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    streams: tuple[int, ...] = (1, 4, 16)
    new_tokens: int = 64
    prefix_tokens: int = 1000
    shared_requests: int = 8
    block_size: int = 16


@dataclass
class WasteMeter:
    """Slots allocated to running requests but not holding K/V, summed over sampled steps.

    Read from the first layer group (full attention for every model kvlm ships).
    """

    allocated: int = 0
    unused: int = 0

    def sample(self, engine: LLMEngine) -> None:
        cache = engine.kv_cache
        for request in engine.scheduler.running:
            if cache.holds(request.request_id):
                slots = cache.groups[0].num_held(request.request_id) * cache.block_size
                self.allocated += slots
                self.unused += slots - request.num_computed_tokens

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
class ServeBenchResult:
    config: ServeBenchConfig
    machine: MachineInfo
    streams: list[StreamsResult] = field(default_factory=list)
    prefix_len: int = 0
    ttft_cold_s: float = 0.0
    ttft_cached_s: float = 0.0
    cached_tokens: int = 0
    hit_rate: float = 0.0
    waste_streams: float = 0.0
    waste_shared: float = 0.0


def _run(engine: LLMEngine, waste: WasteMeter) -> dict[str, RequestOutput]:
    """Step until idle; returns the last (delta) output of every request: its metrics are
    final, its text and token ids only the last step's."""
    final = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
        waste.sample(engine)
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


def bench_prefix(llm: LLM, config: ServeBenchConfig, result: ServeBenchResult) -> None:
    engine = llm.engine
    prefix = long_prefix(llm, config.prefix_tokens)
    result.prefix_len = len(prefix)
    one_token = SamplingParams(max_tokens=1, temperature=0)
    question = llm.tokenizer.encode("\n\n" + QUESTIONS[0], add_special_tokens=False)
    engine.kv_cache.reset_prefix_cache()
    for attempt in ("cold", "cached"):
        engine.add_request(None, prefix + question, one_token)
        (output,) = _run(engine, WasteMeter()).values()
        if attempt == "cold":
            result.ttft_cold_s = output.metrics.ttft_s
        else:
            result.ttft_cached_s = output.metrics.ttft_s
            result.cached_tokens = output.metrics.num_cached_tokens

    engine.kv_cache.reset_prefix_cache()
    stats = engine.scheduler.stats
    queries, hits = stats.num_prefix_queries, stats.num_prefix_hits
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    waste = WasteMeter()
    for i in range(config.shared_requests):
        text = "\n\n" + QUESTIONS[i % len(QUESTIONS)]
        engine.add_request(
            None, prefix + llm.tokenizer.encode(text, add_special_tokens=False), params
        )
        _run(engine, waste)  # one after another, as requests of a chat product arrive
    result.hit_rate = (stats.num_prefix_hits - hits) / (stats.num_prefix_queries - queries)
    result.waste_shared = waste.fraction


def run_serve_bench(
    config: ServeBenchConfig, progress: Callable[[str], None] = lambda line: None
) -> ServeBenchResult:
    progress(f"loading {config.model} ({config.dtype}, blocks of {config.block_size})")
    max_seqs = max(config.streams)
    llm = LLM(config.model, dtype=config.dtype, max_num_seqs=max_seqs, block_size=config.block_size)
    result = ServeBenchResult(config=config, machine=machine_info())
    bench_streams(llm, 1, 8, WasteMeter())  # warm-up
    waste = WasteMeter()
    for n in config.streams:
        r = bench_streams(llm, n, config.new_tokens, waste)
        progress(f"{n} streams: {r.tok_s:.1f} tok/s aggregate, mean TTFT {r.mean_ttft_s:.3f} s")
        result.streams.append(r)
    result.waste_streams = waste.fraction
    bench_prefix(llm, config, result)
    progress(
        f"prefix {result.prefix_len} tok: TTFT cold {result.ttft_cold_s:.3f} s, cached "
        f"{result.ttft_cached_s:.3f} s; hit rate {result.hit_rate:.1%}"
    )
    llm.engine.kv_cache.check_integrity()
    return result


def markdown(result: ServeBenchResult) -> str:
    base = result.streams[0].tok_s if result.streams else 0.0
    lines = [
        "| concurrent streams | aggregate tok/s | vs 1 stream | mean TTFT s |",
        "|---:|---:|---:|---:|",
    ]
    for r in result.streams:
        lines.append(
            f"| {r.num_streams} | {r.tok_s:.1f} | {r.tok_s / base:.2f}x | {r.mean_ttft_s:.3f} |"
        )
    speedup = result.ttft_cold_s / result.ttft_cached_s if result.ttft_cached_s else 0.0
    lines += [
        "",
        "| measure | value |",
        "|---|---:|",
        f"| TTFT, {result.prefix_len}-token prefix cold | {result.ttft_cold_s:.3f} s |",
        f"| TTFT, same prefix cached ({result.cached_tokens} tokens reused) | "
        f"{result.ttft_cached_s:.3f} s |",
        f"| TTFT speedup from the prefix cache | {speedup:.1f}x |",
        f"| prefix-cache hit rate, {result.config.shared_requests} requests sharing the prefix | "
        f"{result.hit_rate:.1%} |",
        f"| KV waste (allocated, unwritten slots), concurrency runs | {result.waste_streams:.2%} |",
        f"| KV waste, shared-prefix requests | {result.waste_shared:.2%} |",
    ]
    m = result.machine
    lines.append(
        f"\nBlocks of {result.config.block_size} tokens. "
        f"Machine: {m.cpu_model}, {m.cpu_count} CPUs, torch {m.torch_version}, "
        f"{m.torch_num_threads} threads, load average {m.load_average}, {m.date}."
    )
    return "\n".join(lines)
