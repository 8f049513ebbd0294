"""Decode throughput: kvlm with its KV cache against baselines, for several output lengths.

Every engine generates exactly N greedy tokens (end-of-sequence ignored) from the same fixed
prompt token ids, noting when each position is reached. Greedy runs are deterministic, so one
run of the longest length holds every shorter one: its first N positions are what a run of N
would do, and each length is read from it. Each engine is loaded once, warmed up with one
untimed short run, then timed `repeats` times. The no-cache baseline recomputes the whole
sequence every step (its cost grows with the square of the length), so every step is timed only
up to `no_cache_max_tokens`; past it one step in `no_cache_stride` is timed and the rest
interpolated (`sampled.py`), and those lengths say so. Nothing here prints: `progress` gets
status lines, tqdm draws the bars.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tqdm import tqdm

from kvlm.bench.backends import (
    Backend,
    BackendUnavailable,
    HFBackend,
    KvlmBackend,
    LlamaCppBackend,
    RunTiming,
)
from kvlm.bench.common import BenchConfigError, Skipped
from kvlm.bench.decode_data import (
    KVLM,
    NO_CACHE,
    DecodeBenchConfig,
    DecodeBenchResult,
    Measurement,
    Trace,
)
from kvlm.bench.machine import kernel_note, load_average, machine_info
from kvlm.bench.sampled import extend, sample_steps
from kvlm.loading import resolve_model_path
from kvlm.tokenizer import Tokenizer

NUM_WARMUP_TOKENS = 2
# A fixed English passage, repeated as needed and cut to --prompt-tokens.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the steps aloud "
    "as his father had done before him. From the lamp room he could see the fishing boats "
    "returning along the coast, their lanterns swaying with the swell, and the town beyond "
    "the harbour settling into the quiet of the night. "
)

Progress = Callable[[str], None]


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
    backend: Backend, prompts: list[list[int]], config: DecodeBenchConfig, longest: int
) -> list[RunTiming]:
    """Time `backend` generating `longest` tokens, `repeats` times, after a warm-up."""
    backend.run(prompts, NUM_WARMUP_TOKENS)
    runs = []
    with tqdm(total=longest * config.repeats, desc=backend.name, unit="tok") as bar:
        for i in range(config.repeats):
            done = i * longest
            runs.append(backend.run(prompts, longest, lambda n, d=done: bar.update(d + n - bar.n)))
    return runs


def _record(
    name: str,
    runs: list[RunTiming],
    lengths: tuple[int, ...],
    config: DecodeBenchConfig,
    result: DecodeBenchResult,
    interpolated_after: int | None = None,
) -> None:
    """One measurement per length, each read from the runs' first `length` tokens."""
    for n in lengths:
        truncated = tuple(r.truncated(n, config.batch_size) for r in runs)
        result.measurements.append(
            Measurement(name, n, config.batch_size, truncated, interpolated_after)
        )


def _measure_no_cache(
    backend: KvlmBackend,
    prompts: list[list[int]],
    config: DecodeBenchConfig,
    result: DecodeBenchResult,
) -> None:
    """Every step up to the cap; past it, one step in `no_cache_stride` (see `sampled.py`)."""
    cap = min(config.no_cache_max_tokens, max(config.new_tokens))
    runs = _measure(backend, prompts, config, cap)
    _record(backend.name, runs, config.lengths(NO_CACHE), config, result)
    trace = Trace.from_runs(backend.name, config.prompt_tokens, runs)
    beyond = config.sampled_lengths()
    if beyond:
        tokenizer = backend.llm.tokenizer
        last = max(beyond) - 1
        count = len(range(cap, last + 1, config.no_cache_stride)) + 1
        with tqdm(total=count, desc=f"{backend.name} sampled steps", unit="step") as bar:
            samples = sample_steps(
                backend,
                lambda num_tokens: prompt_ids(tokenizer, num_tokens, config.batch_size),
                config.prompt_tokens,
                cap,
                last,
                config.no_cache_stride,
                lambda: bar.update(1),
            )
        extended = [extend(r, samples, config.batch_size) for r in runs]
        _record(backend.name, extended, beyond, config, result, interpolated_after=cap)
        trace = dataclasses.replace(trace, sampled=tuple(samples))
    result.traces.append(trace)


def run_decode_bench(
    config: DecodeBenchConfig, progress: Progress = lambda line: None
) -> DecodeBenchResult:
    """Time kvlm, then each baseline, loading each engine once; returns every raw number."""
    cache = config.cache.label()
    progress(
        f"loading {KVLM} ({config.model}, {config.dtype}, {config.weight_format} weights"
        f"{', ' + cache if cache else ''})"
    )
    ours = KvlmBackend(
        config.model,
        config.dtype,
        True,
        config.batch_size,
        config.threads,
        config.weight_format,
        config.cache,
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
    note = kernel_note(config.weight_format)
    result.notes += [note] if note else []
    threads = result.machine.torch_num_threads
    runs = _measure(ours, prompts, config, max(config.new_tokens))
    _record(KVLM, runs, config.new_tokens, config, result)
    result.traces.append(Trace.from_runs(KVLM, config.prompt_tokens, runs))
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
        if isinstance(backend, KvlmBackend):  # the no-cache baseline
            _measure_no_cache(backend, prompts, config, result)
            note_no_cache(config, result)
        else:
            runs = _measure(backend, prompts, config, max(config.new_tokens))
            _record(backend.name, runs, config.new_tokens, config, result)
            result.traces.append(Trace.from_runs(backend.name, config.prompt_tokens, runs))
        del backend
    result.load_average_end = load_average()
    return result


def note_no_cache(config: DecodeBenchConfig, result: DecodeBenchResult) -> None:
    over = [n for n in config.new_tokens if n > config.no_cache_max_tokens]
    if not over:
        return
    lengths = ", ".join(map(str, over))
    if config.no_cache_stride:
        result.notes.append(
            f"{NO_CACHE} at {lengths} new tokens: every step timed up to "
            f"{config.no_cache_max_tokens}, then one step in {config.no_cache_stride} (a "
            "forward pass over the sequence so far, which is what a step without a cache is), "
            "the steps between interpolated"
        )
    else:
        reason = (
            f"not run at {lengths} new tokens: over no_cache_max_tokens "
            f"({config.no_cache_max_tokens}); without a cache every step recomputes the whole "
            "sequence"
        )
        result.skipped.append(Skipped(NO_CACHE, reason))
