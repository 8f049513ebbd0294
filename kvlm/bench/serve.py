"""Serving over HTTP: throughput, TTFT and inter-token latency against concurrency.

`kvlm serve` and each baseline server (llama.cpp's `llama-server`) run as child processes on the
same GGUF with the same threads, one after another, and the same client (`client.py`) sends
them the same prompts: for each N in `streams`, N streamed completions of `new_tokens` greedy
tokens (EOS ignored) start together. Per N and server: aggregate generated tok/s (all tokens
over the time from the first request sent to the last token), and the 50th/90th/99th
percentiles of time to first token and of the gaps between tokens.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kvlm.bench.backends import BackendUnavailable
from kvlm.bench.client import ClientError, completion_body, run_streams
from kvlm.bench.common import BenchConfigError, Skipped, check_threads, resolved_weight_format
from kvlm.bench.machine import MachineInfo, load_average, machine_info, machine_line
from kvlm.bench.servers import (
    RunningServer,
    ServerError,
    ServerSpec,
    find_llama_server,
    kvlm_server,
    llama_server,
)
from kvlm.engine.config import EngineConfig
from kvlm.loading import resolve_model_path

SERVE_BASELINES = ("llama-server",)
PERCENTILES = (50, 90, 99)
WARMUP_TOKENS = 4
# A distinct opening per stream, so no stream reuses another's cached prompt.
PROMPT = "Story {i}: on the morning of the festival,"


@dataclass(frozen=True)
class ServeBenchConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    weight_format: str = EngineConfig.weight_format
    streams: tuple[int, ...] = (1, 4, 16, 64)
    new_tokens: int = 64
    baselines: tuple[str, ...] = ()
    threads: int | None = None  # None: one per core
    llama_server: Path | None = None  # None: found on PATH or where the build script puts it

    def __post_init__(self) -> None:
        if not self.streams or min(self.streams) < 1 or self.new_tokens < 1:
            raise BenchConfigError(
                f"streams need values >= 1 and new_tokens >= 1, got {self.streams} and "
                f"{self.new_tokens}"
            )
        unknown = [b for b in self.baselines if b not in SERVE_BASELINES]
        if unknown:
            raise BenchConfigError(
                f"unknown serve baseline(s) {', '.join(unknown)}; choose from "
                f"{', '.join(SERVE_BASELINES)}"
            )
        check_threads(self.threads)
        EngineConfig(weight_format=self.weight_format, dtype=self.dtype)
        weight_format = resolved_weight_format(self.weight_format, self.model, self.dtype)
        object.__setattr__(self, "weight_format", weight_format)  # "auto" resolved


@dataclass(frozen=True)
class Latency:
    """Percentiles (`PERCENTILES`) of one latency, in seconds."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Latency:
        return cls(*(float(v) for v in np.percentile(values, PERCENTILES)))


@dataclass(frozen=True)
class ConcurrencyResult:
    """One server with `num_streams` streams at once."""

    server: str
    num_streams: int
    wall_s: float
    generated_tokens: int
    ttft_s: Latency
    inter_token_s: Latency

    @property
    def tok_s(self) -> float:
        return self.generated_tokens / self.wall_s


@dataclass
class ServeBenchResult:
    config: ServeBenchConfig
    machine: MachineInfo
    threads: int  # what every server ran with
    results: list[ConcurrencyResult] = field(default_factory=list)
    servers: dict[str, str] = field(default_factory=dict)  # name -> version
    skipped: list[Skipped] = field(default_factory=list)
    load_average_end: tuple[float, float, float] | None = None

    def find(self, server: str, num_streams: int) -> ConcurrencyResult | None:
        for r in self.results:
            if r.server == server and r.num_streams == num_streams:
                return r
        return None


def measure(
    url: str, server: str, model: str, num_streams: int, new_tokens: int
) -> ConcurrencyResult:
    """`num_streams` completions at once; `model` is the name kvlm serves it under."""
    bodies = [completion_body(PROMPT.format(i=i), new_tokens, model) for i in range(num_streams)]
    timings = run_streams(url, bodies)
    tokens = [t.num_tokens for t in timings]
    if tokens != [new_tokens] * num_streams:
        raise ClientError(f"{server} generated {tokens} tokens, not {new_tokens} each")
    gaps = [g for t in timings for g in t.inter_token_s]
    return ConcurrencyResult(
        server=server,
        num_streams=num_streams,
        wall_s=max(t.finished for t in timings) - min(t.sent for t in timings),
        generated_tokens=sum(tokens),
        ttft_s=Latency.of([t.ttft_s for t in timings]),
        inter_token_s=Latency.of(gaps or [0.0]),
    )


def _specs(config: ServeBenchConfig, threads: int, result: ServeBenchResult) -> list[ServerSpec]:
    slots = max(config.streams)
    specs = [kvlm_server(config.model, config.dtype, config.weight_format, threads, slots)]
    for name in config.baselines:
        assert name == "llama-server"
        try:
            binary = find_llama_server(config.llama_server)
            model_path = resolve_model_path(config.model)
            if model_path.suffix != ".gguf":
                raise BackendUnavailable(f"llama-server needs a .gguf file, not {model_path}")
            ctx = 64 + config.new_tokens  # the prompt (under 20 tokens) and the completion
            specs.append(llama_server(binary, model_path, threads, slots, ctx))
        except BackendUnavailable as e:
            result.skipped.append(Skipped(name, str(e)))
    return specs


def _measure_all(
    url: str,
    server: str,
    config: ServeBenchConfig,
    result: ServeBenchResult,
    progress: Callable[[str], None],
) -> None:
    measure(url, server, config.model, 1, WARMUP_TOKENS)
    for n in tqdm(config.streams, desc=server, unit="run"):
        r = measure(url, server, config.model, n, config.new_tokens)
        result.results.append(r)
        progress(
            f"{server}, {n} streams: {r.tok_s:.1f} tok/s, TTFT p50 {r.ttft_s.p50:.3f} s, "
            f"inter-token p50 {r.inter_token_s.p50 * 1000:.1f} ms"
        )


def run_serve_bench(
    config: ServeBenchConfig, progress: Callable[[str], None] = lambda line: None
) -> ServeBenchResult:
    """Start each server in turn and time every concurrency against it."""
    threads = config.threads or torch.get_num_threads()  # every server gets the same
    result = ServeBenchResult(config, machine_info(), threads)
    specs = _specs(config, threads, result)
    for skipped in result.skipped:
        progress(f"skipping {skipped.engine}: {skipped.reason}")
    with tempfile.TemporaryDirectory(prefix="kvlm-bench-") as logs:
        for spec in specs:
            progress(f"starting {spec.name} ({spec.version}, {threads} threads)")
            try:
                server = RunningServer(spec, Path(logs) / f"{spec.name}.log")
            except ServerError as e:
                if spec.name == "kvlm":
                    raise
                progress(f"skipping {spec.name}: {e}")  # a baseline's failure ends only it
                result.skipped.append(Skipped(spec.name, str(e)))
                continue
            result.servers[spec.name] = spec.version
            with server:
                _measure_all(server.url, spec.name, config, result, progress)
    result.load_average_end = load_average()
    return result


def markdown(result: ServeBenchResult) -> str:
    """One row per concurrency: each server's tok/s and latencies, and kvlm's ratio."""
    names = list(result.servers)
    baselines = names[1:]
    lines = [
        "| streams | "
        + " | ".join(f"{s} tok/s" for s in names)
        + "".join(f" | kvlm vs {b}" for b in baselines)
        + "".join(f" | {s} TTFT p50 / p99 s | {s} inter-token p50 / p99 ms" for s in names)
        + " |",
        "|---:|" + "---:|" * (len(names) + len(baselines) + 2 * len(names)),
    ]
    for n in result.config.streams:
        found = [result.find(s, n) for s in names]
        cells = ["–" if r is None else f"{r.tok_s:.1f}" for r in found]
        ours = found[0]
        for r in found[1:]:
            cells.append("–" if r is None or ours is None else f"{ours.tok_s / r.tok_s:.2f}×")
        for r in found:
            if r is None:
                cells += ["–", "–"]
                continue
            t, g = r.ttft_s, r.inter_token_s
            cells += [f"{t.p50:.3f} / {t.p99:.3f}", f"{g.p50 * 1000:.1f} / {g.p99 * 1000:.1f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    c, m = result.config, result.machine
    lines += [
        "",
        f"{c.model} ({c.dtype}, {c.weight_format} weights in kvlm), {c.new_tokens} greedy tokens "
        f"per stream, EOS ignored, over HTTP (streamed /v1/completions), {result.threads} "
        "threads per server.",
        *[f"Server: {name}: {version}." for name, version in result.servers.items()],
        machine_line(m),
        *[f"Skipped {s.engine}: {s.reason}." for s in result.skipped],
    ]
    return "\n".join(lines)


def to_json(result: ServeBenchResult) -> dict[str, Any]:
    """Every number, the settings, the servers' versions and the machine, as plain JSON."""
    return {
        "benchmark": "serve",
        "config": dataclasses.asdict(result.config),
        "machine": dataclasses.asdict(result.machine),
        "threads": result.threads,
        "servers": result.servers,
        "results": [{**dataclasses.asdict(r), "tok_s": r.tok_s} for r in result.results],
        "skipped": [dataclasses.asdict(s) for s in result.skipped],
        "load_average_end": result.load_average_end,
    }
