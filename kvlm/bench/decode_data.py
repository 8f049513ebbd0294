"""The decode benchmark's settings and what it measured: per length, per engine, per token."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from kvlm.bench.backends import KVCacheOptions, RunTiming
from kvlm.bench.common import BenchConfigError, Skipped, check_threads, resolved_weight_format
from kvlm.bench.machine import MachineInfo
from kvlm.engine.config import EngineConfig
from kvlm.engine.weight_format import WEIGHT_FORMAT_CHOICES

BASELINES = ("no-cache", "hf", "llama.cpp")
KVLM = "kvlm"
NO_CACHE = "kvlm-no-cache"


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
    no_cache_max_tokens: int = 512  # the no-cache baseline times every step up to here
    no_cache_stride: int = 32  # past it, one step in this many (0: lengths past it not run)
    weight_format: str = EngineConfig.weight_format
    cache: KVCacheOptions = KVCacheOptions()  # kvlm's cache (the no-cache baseline has none)

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
        if self.no_cache_stride < 0:
            raise BenchConfigError(f"no_cache_stride must be >= 0, got {self.no_cache_stride}")
        check_threads(self.threads)
        if self.weight_format not in WEIGHT_FORMAT_CHOICES:
            raise BenchConfigError(
                f"weight_format must be one of {', '.join(WEIGHT_FORMAT_CHOICES)}, "
                f"got {self.weight_format!r}"
            )
        press = self.cache.kv_press
        if press is not None and press.method == "snapkv" and press.window >= self.prompt_tokens:
            raise BenchConfigError(
                f"the snapkv press scores the prompt by its last {press.window} tokens, but "
                f"prompt_tokens is {self.prompt_tokens}: raise --prompt-tokens above the window "
                "or pass a smaller window (window=W)"
            )
        weight_format = resolved_weight_format(self.weight_format, self.model, self.dtype)
        object.__setattr__(self, "weight_format", weight_format)  # "auto" resolved

    def lengths(self, engine: str) -> tuple[int, ...]:
        """The lengths at which every step of `engine` is timed (no-cache: up to its cap)."""
        if engine == NO_CACHE:
            return tuple(n for n in self.new_tokens if n <= self.no_cache_max_tokens)
        return self.new_tokens

    def sampled_lengths(self) -> tuple[int, ...]:
        """The no-cache lengths past the cap, read from sampled steps."""
        if self.no_cache_stride == 0:
            return ()
        return tuple(n for n in self.new_tokens if n > self.no_cache_max_tokens)


@dataclass(frozen=True)
class Measurement:
    """One engine at one length: every timed run, and their medians."""

    engine: str
    num_new_tokens: int
    batch_size: int
    runs: tuple[RunTiming, ...]
    # Set when steps past this many tokens were sampled, one in `no_cache_stride`, and the
    # others interpolated; None when every step was timed.
    interpolated_after: int | None = None

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
    sampled: tuple[tuple[int, float], ...] = ()  # (i, seconds) of single steps timed past it

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

    def sampled_ms_at(self, num_new_tokens: int) -> float | None:
        """Ms of the last sampled step at or before the `num_new_tokens`-th token, if any."""
        before = [s for i, s in self.sampled if i < num_new_tokens]
        return 1000 * before[-1] if before else None


@dataclass(frozen=True)
class Speedup:
    """kvlm (with its cache) over one baseline at one length; > 1 means kvlm is faster."""

    baseline: str
    num_new_tokens: int
    tok_s: float
    decode_tok_s: float | None


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
