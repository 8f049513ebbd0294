"""`kvlm bench all`: every benchmark in one run, its JSON and tables, and the PNG figures.

The sizes are chosen to finish in well under 20 minutes on an idle 2-core machine; before
starting, `estimate_s` says how long the run should take there, from rates measured on the
reference machine (AMD EPYC Zen 4, 2 vCPUs, SmolLM2 fp32, 2 threads). A busy machine takes
longer; the JSON records the time each part really took.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlm.bench import memory, plots, prefix, report, serve
from kvlm.bench.decode import run_decode_bench
from kvlm.bench.decode_data import DecodeBenchConfig
from kvlm.bench.memory import MemoryBenchConfig
from kvlm.bench.prefix import PrefixBenchConfig
from kvlm.bench.serve import ServeBenchConfig

# Reference rates (SmolLM2 fp32, 2 threads, idle AMD EPYC Zen 4): only for the estimate.
LOAD_S = {"kvlm": 5.0, "hf": 20.0, "llama.cpp": 2.0, "server": 12.0}
DECODE_TOK_S = {"kvlm": 24.0, "hf": 18.0, "llama.cpp": 110.0}
PREFILL_TOK_S = 450.0  # one no-cache step at position p costs a prefill of p tokens
STEP_OVERHEAD_S = 0.04
BATCHED_TOK_S = 200.0  # aggregate decode rate once many streams share a step


@dataclass(frozen=True)
class SuiteConfig:
    decode: DecodeBenchConfig
    serve: ServeBenchConfig
    prefix: PrefixBenchConfig
    memory: MemoryBenchConfig


def default_suite(
    model: str, threads: int | None, weight_format: str, dtype: str, smoke: bool = False
) -> SuiteConfig:
    """The sizes `kvlm bench all` runs: the issue's lengths and loads, on one model. `smoke`
    shrinks every size so the whole suite checks its plumbing in about a minute (numbers
    meaningless)."""
    common: dict[str, Any] = {"model": model, "threads": threads, "weight_format": weight_format}
    lengths, no_cache_max, prefixes = (32, 128, 512, 1024), 512, (256, 512, 1000)
    streams, new_tokens, measured = (1, 4, 16, 64), 64, (256, 1024, 2048)
    if smoke:
        lengths, no_cache_max, prefixes = (4, 8), 4, (32, 64)
        streams, new_tokens, measured = (1, 2), 4, (32,)
    return SuiteConfig(
        decode=DecodeBenchConfig(
            new_tokens=lengths,
            baselines=("no-cache", "hf", "llama.cpp"),
            no_cache_max_tokens=no_cache_max,
            dtype=dtype,
            **common,
        ),
        serve=ServeBenchConfig(
            streams=streams,
            new_tokens=new_tokens,
            baselines=("llama-server",),
            dtype=dtype,
            **common,
        ),
        prefix=PrefixBenchConfig(
            streams=streams, new_tokens=new_tokens, prefix_tokens=prefixes, dtype=dtype, **common
        ),
        memory=MemoryBenchConfig(
            model=model,
            threads=threads,
            dtype=dtype,
            max_tokens=1024 if smoke else 8192,
            step=64 if smoke else 256,
            measured_tokens=measured,
            window=16 if smoke else 512,
        ),
    )


def _streams_s(streams: tuple[int, ...], new_tokens: int) -> float:
    return sum(n * new_tokens / min(DECODE_TOK_S["kvlm"] * n, BATCHED_TOK_S) for n in streams)


def estimate_s(suite: SuiteConfig) -> dict[str, float]:
    """Seconds each benchmark should take on the idle reference machine."""
    d = suite.decode
    longest = max(d.new_tokens)
    decode_s = LOAD_S["kvlm"] + longest / DECODE_TOK_S["kvlm"]
    for name in d.baselines:
        if name == "no-cache":
            cap = min(d.no_cache_max_tokens, longest)
            steps = list(range(cap))  # every step up to the cap, then one in the stride
            if d.sampled_lengths():
                steps += [*range(cap, longest, d.no_cache_stride), longest - 1]
            cost = sum((d.prompt_tokens + i) / PREFILL_TOK_S + STEP_OVERHEAD_S for i in steps)
            decode_s += LOAD_S["kvlm"] + cost
        else:
            decode_s += LOAD_S[name] + longest / DECODE_TOK_S[name]
    s = suite.serve
    serve_s = (1 + len(s.baselines)) * (LOAD_S["server"] + _streams_s(s.streams, s.new_tokens))
    p = suite.prefix
    prefix_s = LOAD_S["kvlm"] + _streams_s(p.streams, p.new_tokens)
    prefix_s += sum(2 * n / PREFILL_TOK_S for n in p.prefix_tokens) + p.shared_requests
    m = suite.memory
    runnable = len(m.techniques()) - 1  # the multi-head layout is calculated only
    memory_s = runnable * (LOAD_S["kvlm"] + sum(m.measured_tokens) / PREFILL_TOK_S)
    return {
        "decode": decode_s * d.repeats,
        "serve": serve_s,
        "prefix": prefix_s,
        "memory": memory_s,
    }


def run_suite(
    suite: SuiteConfig, out: Path, progress: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Run every benchmark, writing `<name>.json` and `<name>.md` as each ends, then the PNGs
    and `suite.json` (estimate and real seconds of each part). Returns suite.json's object."""
    out.mkdir(parents=True, exist_ok=True)
    estimate = estimate_s(suite)
    timings: dict[str, float] = {}
    data: dict[str, dict[str, Any]] = {}
    parts = [
        ("decode", lambda: run_decode_bench(suite.decode, progress), report),
        ("serve", lambda: serve.run_serve_bench(suite.serve, progress), serve),
        ("prefix", lambda: prefix.run_prefix_bench(suite.prefix, progress), prefix),
        ("memory", lambda: memory.run_memory_bench(suite.memory, progress), memory),
    ]
    for name, run, module in parts:
        progress(f"== {name} (estimate {estimate[name] / 60:.1f} min) ==")
        start = time.perf_counter()
        result = run()
        timings[name] = time.perf_counter() - start
        data[name] = module.to_json(result)
        (out / f"{name}.json").write_text(json.dumps(data[name], indent=2, default=str) + "\n")
        (out / f"{name}.md").write_text(module.markdown(result) + "\n")
        progress(f"{name}: {timings[name]:.0f} s; wrote {out / name}.json and .md")
    figures = [
        plots.decode_per_token(data["decode"], out / "decode_per_token.png"),
        plots.ttft_vs_inter_token(data["serve"], out / "ttft_vs_inter_token.png"),
        plots.throughput_vs_concurrency(
            data["serve"], out / "throughput_vs_concurrency.png", data["prefix"]
        ),
        plots.memory_vs_tokens(data["memory"], out / "memory_vs_tokens.png"),
        plots.prefix_ttft(data["prefix"], out / "prefix_ttft.png"),
    ]
    summary = {
        "benchmark": "all",
        "estimate_s": estimate,
        "elapsed_s": timings,
        "files": sorted([f"{n}.json" for n in data] + [f"{n}.md" for n in data])
        + [f.name for f in figures],
    }
    (out / "suite.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
