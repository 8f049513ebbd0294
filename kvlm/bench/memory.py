"""KV cache bytes against sequence length, technique by technique.

Each technique is a way of laying out one model's cache: the plain cache (the model's own
grouped-query layout in its dtype), the same model with one K/V head per query head (the
multi-head layout GQA saves against), a sliding window, a window with attention sinks, and
int8 / int4 storage. The curve of each comes from the calculator (`kvlm.kv.memory.estimate`,
the figures `kvlm memory` prints); where the engine can run the technique, a few points are
also measured: the engine prefills a prompt of that many tokens (in chunks of
`prefill_chunk`, as the curve assumes) and reports the request's `kv_peak_bytes`. The
multi-head layout is a different model, so it is calculated only. Every point says its source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from kvlm.bench.common import BenchConfigError, check_threads
from kvlm.bench.decode import prompt_ids
from kvlm.bench.machine import MachineInfo, machine_info
from kvlm.config import ModelConfig
from kvlm.engine.config import EngineConfig
from kvlm.engine.llm import LLM
from kvlm.kv.memory import estimate
from kvlm.loading.shape import read_model_shape
from kvlm.sampling import SamplingParams

CALCULATED = "calculator"
MEASURED = "engine kv_peak_bytes"


@dataclass(frozen=True)
class Technique:
    """One cache layout; `multi_head` swaps the model's K/V heads for one per query head."""

    name: str
    kv_format: str
    sliding_window: int | None = None
    num_sinks: int = 0
    multi_head: bool = False


@dataclass(frozen=True)
class MemoryBenchConfig:
    model: str = "smollm2"
    max_tokens: int = 8192  # the curve runs from `step` to here
    step: int = 256
    measured_tokens: tuple[int, ...] = (256, 1024, 2048)  # () measures nothing
    window: int = 512
    sinks: int = 4
    block_size: int = 16
    prefill_chunk: int = 64
    dtype: str = "float32"  # the plain cache's format: what kvlm runs the model in
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.step <= self.max_tokens:
            raise BenchConfigError(
                f"step must be in [1, max_tokens={self.max_tokens}], got {self.step}"
            )
        if any(n < 2 or n > self.max_tokens for n in self.measured_tokens):
            raise BenchConfigError(
                f"measured_tokens must be in [2, {self.max_tokens}], got {self.measured_tokens}"
            )
        if self.window < 1 or self.sinks < 1 or self.prefill_chunk < 1:
            raise BenchConfigError("window, sinks and prefill_chunk must be >= 1")
        check_threads(self.threads)
        EngineConfig(block_size=self.block_size, dtype=self.dtype)

    def techniques(self) -> tuple[Technique, ...]:
        w, s = self.window, self.sinks
        return (
            Technique(f"plain ({self.dtype}, GQA)", self.dtype),
            Technique(f"multi-head equivalent ({self.dtype})", self.dtype, multi_head=True),
            Technique(f"sliding window {w}", self.dtype, w),
            Technique(f"window {w} + {s} sinks", self.dtype, w, s),
            Technique("int8", "int8"),
            Technique("int4", "int4"),
        )


@dataclass(frozen=True)
class MemoryPoint:
    technique: str
    num_tokens: int
    kv_bytes: int
    source: str  # CALCULATED or MEASURED
    calculated_bytes: int  # the calculator's figure for the same point (equal when it agrees)


@dataclass
class MemoryBenchResult:
    config: MemoryBenchConfig
    machine: MachineInfo
    model: ModelConfig
    points: list[MemoryPoint] = field(default_factory=list)

    def series(self, technique: str, source: str) -> list[MemoryPoint]:
        return [p for p in self.points if p.technique == technique and p.source == source]


def _calculate(model: ModelConfig, t: Technique, n: int, config: MemoryBenchConfig) -> int:
    if t.multi_head:
        model = dataclasses.replace(model, num_kv_heads=model.num_heads)
    est = estimate(
        model,
        n,
        t.kv_format,
        block_size=config.block_size,
        sliding_window=t.sliding_window,
        num_sinks=t.num_sinks,
        prompt_tokens=n,
        prefill_chunk=config.prefill_chunk,
    )
    return est.total_bytes


def _measure(t: Technique, config: MemoryBenchConfig) -> dict[int, int]:
    """Prefill a prompt of each measured length on an engine set up for `t`; peak KV bytes."""
    llm = LLM(
        model=config.model,
        dtype=config.dtype,
        kv_cache_dtype=t.kv_format,
        sliding_window=t.sliding_window,
        attention_sinks=t.num_sinks,
        block_size=config.block_size,
        max_num_batched_tokens=config.prefill_chunk,
        max_model_len=max(config.measured_tokens) + 1,
        num_threads=config.threads,
    )
    params = SamplingParams(max_tokens=1, temperature=0)
    out = {}
    for n in config.measured_tokens:
        (prompt,) = prompt_ids(llm.tokenizer, n, 1)
        (output,) = llm.generate({"prompt_token_ids": prompt}, params)
        out[n] = output.metrics.kv_peak_bytes
    return out


def run_memory_bench(
    config: MemoryBenchConfig, progress: Callable[[str], None] = lambda line: None
) -> MemoryBenchResult:
    shape = read_model_shape(config.model)
    result = MemoryBenchResult(config, machine_info(), shape.config)
    curve = sorted(
        {config.block_size, *range(config.step, config.max_tokens + 1, config.step)}
        | set(config.measured_tokens)
    )
    for t in config.techniques():
        for n in curve:
            nbytes = _calculate(shape.config, t, n, config)
            result.points.append(MemoryPoint(t.name, n, nbytes, CALCULATED, nbytes))
    runnable = [t for t in config.techniques() if not t.multi_head]
    if config.measured_tokens:
        for t in tqdm(runnable, desc="memory: engine runs", unit="technique"):
            for n, nbytes in _measure(t, config).items():
                calculated = _calculate(shape.config, t, n, config)
                result.points.append(MemoryPoint(t.name, n, nbytes, MEASURED, calculated))
                if nbytes != calculated:
                    progress(
                        f"{t.name} at {n} tokens: the engine held {nbytes:,} bytes, the "
                        f"calculator says {calculated:,}"
                    )
    result.machine = machine_info()  # after the engines set the threads
    return result


def markdown(result: MemoryBenchResult) -> str:
    """Bytes per sequence at a few lengths, technique by technique, and against plain."""
    c = result.config
    lengths = sorted({*c.measured_tokens, c.max_tokens})
    measured = {(p.technique, p.num_tokens): p for p in result.points if p.source == MEASURED}
    techniques = c.techniques()
    lines = [
        "| technique | "
        + " | ".join(f"{n} tokens, MiB" for n in lengths)
        + f" | plain ÷ this at {c.max_tokens} |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]
    plain = _calculate(result.model, techniques[0], c.max_tokens, c)
    for t in techniques:
        cells = []
        for n in lengths:
            point = measured.get((t.name, n))
            if point is not None:
                cells.append(f"{point.kv_bytes / 2**20:.2f}")
            else:
                cells.append(f"{_calculate(result.model, t, n, c) / 2**20:.2f} (calc.)")
        ratio = plain / _calculate(result.model, t, c.max_tokens, c)
        lines.append(f"| {t.name} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
    disagree = [p for p in measured.values() if p.kv_bytes != p.calculated_bytes]
    if not measured:
        agreement = "nothing was measured (--measured-tokens '')"
    elif not disagree:
        agreement = "every measured point equals the calculator's figure"
    else:
        agreement = f"{len(disagree)} measured point(s) differ from the calculator"
    lines += [
        "",
        f"One sequence of {c.model} ({result.model.num_layers} layers), blocks of "
        f"{c.block_size}, prompt prefilled in chunks of {c.prefill_chunk}. Figures without "
        "'(calc.)' are the engine's own kv_peak_bytes, the others the calculator's "
        f"(kvlm.kv.memory); {agreement}.",
    ]
    return "\n".join(lines)


def to_json(result: MemoryBenchResult) -> dict[str, Any]:
    return {
        "benchmark": "memory",
        "config": dataclasses.asdict(result.config),
        "machine": dataclasses.asdict(result.machine),
        "model": dataclasses.asdict(result.model),
        "techniques": [dataclasses.asdict(t) for t in result.config.techniques()],
        "points": [dataclasses.asdict(p) for p in result.points],
    }
