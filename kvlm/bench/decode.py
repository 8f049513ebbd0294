"""Decode throughput: kvlm with its KV cache against baselines, for several output lengths.

For each length N every engine generates exactly N greedy tokens (end-of-sequence ignored) from
the same fixed prompt token ids. Each engine is loaded once, warmed up with one untimed short
run, then timed `repeats` times per length. Nothing here prints; `progress` gets status lines.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from kvlm.bench.backends import (
    Backend,
    BackendUnavailable,
    HFBackend,
    KvlmBackend,
    LlamaCppBackend,
    RunTiming,
)
from kvlm.bench.machine import MachineInfo, load_average, machine_info
from kvlm.loading import resolve_model_path
from kvlm.tokenizer import Tokenizer

BASELINES = ("no-cache", "hf", "llama.cpp")
KVLM = "kvlm"
NUM_WARMUP_TOKENS = 2
# A fixed English passage, repeated as needed and cut to --prompt-tokens.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the steps aloud "
    "as his father had done before him. From the lamp room he could see the fishing boats "
    "returning along the coast, their lanterns swaying with the swell, and the town beyond "
    "the harbour settling into the quiet of the night. "
)

Progress = Callable[[str], None]


class BenchConfigError(ValueError):
    """A benchmark setting that cannot work; the message says which and why."""


@dataclass(frozen=True)
class DecodeBenchConfig:
    model: str = "smollm2"
    new_tokens: tuple[int, ...] = (32, 128, 512)
    baselines: tuple[str, ...] = ("no-cache", "hf")
    batch_size: int = 1
    prompt_tokens: int = 16
    dtype: str = "float32"
    repeats: int = 1

    def __post_init__(self) -> None:
        if not self.new_tokens or min(self.new_tokens) < 1:
            raise BenchConfigError(f"new_tokens must be integers >= 1, got {self.new_tokens}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise BenchConfigError(
                f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}"
            )
        for name in ("batch_size", "prompt_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise BenchConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Measurement:
    """One engine at one length: every timed run, and their medians."""

    engine: str
    num_new_tokens: int
    batch_size: int
    runs: tuple[RunTiming, ...]

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def tok_s(self) -> float:
        """Generated tokens over total wall time (prefill included), median run."""
        return self.num_new_tokens * self.batch_size / self.wall_s

    @property
    def decode_tok_s(self) -> float | None:
        rates = [r.decode_tok_s for r in self.runs if r.decode_tok_s is not None]
        return statistics.median(rates) if rates else None

    @property
    def prefill_s(self) -> float | None:
        times = [r.prefill_s for r in self.runs if r.prefill_s is not None]
        return statistics.median(times) if times else None


@dataclass(frozen=True)
class Speedup:
    """kvlm (with its cache) over one baseline at one length; > 1 means kvlm is faster."""

    baseline: str
    num_new_tokens: int
    tok_s: float
    decode_tok_s: float | None


@dataclass(frozen=True)
class Skipped:
    engine: str
    reason: str


@dataclass
class DecodeBenchResult:
    config: DecodeBenchConfig
    machine: MachineInfo
    prompt_token_ids: list[list[int]]
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_average_end: tuple[float, float, float] | None = None

    def find(self, engine: str, num_new_tokens: int) -> Measurement | None:
        for m in self.measurements:
            if m.engine == engine and m.num_new_tokens == num_new_tokens:
                return m
        return None

    def speedups(self) -> list[Speedup]:
        out = []
        for n in self.config.new_tokens:
            ours = self.find(KVLM, n)
            for m in self.measurements:
                if ours is None or m.engine == KVLM or m.num_new_tokens != n:
                    continue
                decode = None
                if ours.decode_tok_s is not None and m.decode_tok_s is not None:
                    decode = ours.decode_tok_s / m.decode_tok_s
                out.append(Speedup(m.engine, n, ours.tok_s / m.tok_s, decode))
        return out


def prompt_ids(tokenizer: Tokenizer, prompt_tokens: int, batch_size: int) -> list[list[int]]:
    """`batch_size` distinct prompts of exactly `prompt_tokens` ids from the fixed passage.

    Row b keeps the first id (BOS, where the model has one) and shifts the rest by b, so no two
    rows share a prefix block.
    """
    text = PROMPT_TEXT
    ids = tokenizer.encode(text)
    while len(ids) < prompt_tokens + batch_size:
        text += PROMPT_TEXT
        ids = tokenizer.encode(text)
    return [ids[:1] + ids[1 + b : prompt_tokens + b] for b in range(batch_size)]


def _load(name: str, config: DecodeBenchConfig, num_ctx: int) -> Backend:
    model_path = resolve_model_path(config.model)
    if name == "no-cache":
        return KvlmBackend(config.model, config.dtype, False, config.batch_size)
    if name == "hf":
        return HFBackend(model_path, config.dtype)
    if name == "llama.cpp":
        return LlamaCppBackend(model_path, num_ctx)
    raise AssertionError(f"unknown baseline {name}")


def _measure(
    backend: Backend,
    prompts: list[list[int]],
    config: DecodeBenchConfig,
    progress: Progress,
) -> list[Measurement]:
    backend.run(prompts, NUM_WARMUP_TOKENS)
    out = []
    for n in config.new_tokens:
        runs = []
        for i in range(config.repeats):
            timing = backend.run(prompts, n)
            runs.append(timing)
            progress(
                f"{backend.name} N={n} run {i + 1}/{config.repeats}: {timing.wall_s:.2f} s, "
                f"{timing.num_generated_tokens / timing.wall_s:.1f} tok/s"
            )
        out.append(Measurement(backend.name, n, config.batch_size, tuple(runs)))
    return out


def run_decode_bench(
    config: DecodeBenchConfig, progress: Progress = lambda line: None
) -> DecodeBenchResult:
    """Time kvlm, then each baseline, loading each engine once; returns every raw number."""
    progress(f"loading {KVLM} ({config.model}, {config.dtype})")
    ours = KvlmBackend(config.model, config.dtype, True, config.batch_size)
    longest = config.prompt_tokens + max(config.new_tokens)
    if longest > ours.max_model_len:
        raise BenchConfigError(
            f"prompt_tokens + new_tokens = {longest} exceeds the model's context of "
            f"{ours.max_model_len}; ask for fewer tokens"
        )
    prompts = prompt_ids(ours.llm.tokenizer, config.prompt_tokens, config.batch_size)
    result = DecodeBenchResult(config, machine_info(), prompts)
    result.measurements += _measure(ours, prompts, config, progress)
    del ours
    for name in config.baselines:
        progress(f"loading {name}")
        try:
            backend = _load(name, config, num_ctx=longest + 1)
        except BackendUnavailable as e:
            progress(f"skipping {name}: {e}")
            result.skipped.append(Skipped(name, str(e)))
            continue
        result.notes += backend.notes
        result.measurements += _measure(backend, prompts, config, progress)
        del backend
    result.load_average_end = load_average()
    return result
