"""Decode throughput: kvlm with its KV cache against baselines, for several output lengths.

Every engine generates exactly N greedy tokens (end-of-sequence ignored) from the same fixed
prompt token ids, noting when each position is reached. Greedy runs are deterministic, so one
run of the longest length holds every shorter one: its first N positions are what a run of N
would do, and each length is read from it. Each engine is loaded once, warmed up with one
untimed short run, then timed `repeats` times. The no-cache baseline recomputes the whole
sequence every step (its cost grows with the square of the length), so it runs only up to
`no_cache_max_tokens`. Nothing here prints: `progress` gets status lines, tqdm draws the bars.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from kvlm.bench.backends import (
    Backend,
    BackendUnavailable,
    HFBackend,
    KvlmBackend,
    LlamaCppBackend,
    RunTiming,
)
from kvlm.bench.machine import MachineInfo, load_average, machine_info
from kvlm.engine.config import WEIGHT_FORMATS, EngineConfig
from kvlm.loading import resolve_model_path
from kvlm.tokenizer import Tokenizer

BASELINES = ("no-cache", "hf", "llama.cpp")
KVLM = "kvlm"
NO_CACHE = "kvlm-no-cache"
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


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise BenchConfigError(f"threads must be >= 1, got {threads}")


@dataclass(frozen=True)
class DecodeBenchConfig:
    model: str = "smollm2"
    new_tokens: tuple[int, ...] = (32, 128, 512, 1024)
    baselines: tuple[str, ...] = ("no-cache", "hf")
    batch_size: int = 1
    prompt_tokens: int = 16
    dtype: str = "float32"
    repeats: int = 1
    threads: int | None = None  # torch's (and llama.cpp's) CPU threads; None: one per core
    no_cache_max_tokens: int = 512  # lengths above it are not run without the cache
    weight_format: str = EngineConfig.weight_format

    def __post_init__(self) -> None:
        if not self.new_tokens or min(self.new_tokens) < 1:
            raise BenchConfigError(f"new_tokens must be integers >= 1, got {self.new_tokens}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise BenchConfigError(
                f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}"
            )
        for name in ("batch_size", "prompt_tokens", "repeats", "no_cache_max_tokens"):
            if getattr(self, name) < 1:
                raise BenchConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_threads(self.threads)
        if self.weight_format not in WEIGHT_FORMATS:
            raise BenchConfigError(
                f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, "
                f"got {self.weight_format!r}"
            )

    def lengths(self, engine: str) -> tuple[int, ...]:
        """The lengths `engine` is timed at (the no-cache baseline stops at its cap)."""
        if engine == NO_CACHE:
            return tuple(n for n in self.new_tokens if n <= self.no_cache_max_tokens)
        return self.new_tokens


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
class Trace:
    """One engine's time per generated token against its place in the sequence.

    `step_s[i]` is the median over runs of the time between positions i - 1 and i (for i = 0:
    prefill and the first token); the token sits at position `prompt_tokens + i`."""

    engine: str
    prompt_tokens: int
    step_s: tuple[float, ...]

    @classmethod
    def from_runs(cls, engine: str, prompt_tokens: int, runs: list[RunTiming]) -> Trace:
        steps = []
        for r in runs:
            times = r.token_times_s
            steps.append([b - a for a, b in zip((0.0, *times[:-1]), times, strict=True)])
        return cls(engine, prompt_tokens, tuple(map(statistics.median, zip(*steps, strict=True))))

    def step_ms_near(self, num_new_tokens: int, width: int = 16) -> float:
        """Median ms per token over the `width` steps up to the `num_new_tokens`-th one."""
        window = self.step_s[max(1, num_new_tokens - width) : num_new_tokens]
        return 1000 * statistics.median(window or self.step_s[:1])


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
    traces: list[Trace] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_average_end: tuple[float, float, float] | None = None

    def find(self, engine: str, num_new_tokens: int) -> Measurement | None:
        for m in self.measurements:
            if m.engine == engine and m.num_new_tokens == num_new_tokens:
                return m
        return None

    def engines(self) -> list[str]:
        return list(dict.fromkeys(m.engine for m in self.measurements))

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


def _load(name: str, config: DecodeBenchConfig, num_ctx: int, threads: int) -> Backend:
    if name == "no-cache":
        return KvlmBackend(
            config.model,
            config.dtype,
            False,
            config.batch_size,
            config.threads,
            config.weight_format,
        )
    model_path = resolve_model_path(config.model)
    if name == "hf":
        return HFBackend(model_path, config.dtype)
    if name == "llama.cpp":
        return LlamaCppBackend(model_path, num_ctx, threads)
    raise AssertionError(f"unknown baseline {name}")


def _measure(
    backend: Backend,
    prompts: list[list[int]],
    config: DecodeBenchConfig,
    result: DecodeBenchResult,
) -> None:
    """Time `backend` at its longest length `repeats` times; every length is read from that."""
    lengths = config.lengths(backend.name)
    longest = max(lengths)
    backend.run(prompts, NUM_WARMUP_TOKENS)
    runs = []
    with tqdm(total=longest * config.repeats, desc=backend.name, unit="tok") as bar:
        for i in range(config.repeats):
            done = i * longest
            runs.append(backend.run(prompts, longest, lambda n, d=done: bar.update(d + n - bar.n)))
    for n in lengths:
        truncated = tuple(r.truncated(n, config.batch_size) for r in runs)
        result.measurements.append(Measurement(backend.name, n, config.batch_size, truncated))
    result.traces.append(Trace.from_runs(backend.name, config.prompt_tokens, runs))


def run_decode_bench(
    config: DecodeBenchConfig, progress: Progress = lambda line: None
) -> DecodeBenchResult:
    """Time kvlm, then each baseline, loading each engine once; returns every raw number."""
    progress(f"loading {KVLM} ({config.model}, {config.dtype}, {config.weight_format} weights)")
    ours = KvlmBackend(
        config.model,
        config.dtype,
        True,
        config.batch_size,
        config.threads,
        config.weight_format,
    )
    longest = config.prompt_tokens + max(config.new_tokens)
    if longest > ours.max_model_len:
        raise BenchConfigError(
            f"prompt_tokens + new_tokens = {longest} exceeds the model's context of "
            f"{ours.max_model_len}; ask for fewer tokens"
        )
    prompts = prompt_ids(ours.llm.tokenizer, config.prompt_tokens, config.batch_size)
    # After the engine set torch's threads: the record says what ran.
    result = DecodeBenchResult(config, machine_info(), prompts)
    threads = result.machine.torch_num_threads
    _measure(ours, prompts, config, result)
    del ours
    for name in config.baselines:
        progress(f"loading {name}")
        try:
            backend = _load(name, config, longest + 1, threads)
        except BackendUnavailable as e:
            progress(f"skipping {name}: {e}")
            result.skipped.append(Skipped(name, str(e)))
            continue
        result.notes += backend.notes
        over = [n for n in config.new_tokens if n not in config.lengths(backend.name)]
        if over:
            reason = (
                f"not run at {', '.join(map(str, over))} new tokens: over no_cache_max_tokens "
                f"({config.no_cache_max_tokens}); without a cache every step recomputes the "
                "whole sequence"
            )
            result.skipped.append(Skipped(backend.name, reason))
        if config.lengths(backend.name):
            _measure(backend, prompts, config, result)
        del backend
    result.load_average_end = load_average()
    return result
