"""A decode benchmark's result as markdown tables, and as JSON with every raw number."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvlm.bench.decode_data import KVLM, DecodeBenchResult, Measurement
from kvlm.bench.machine import machine_line


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _measurement_row(m: Measurement) -> str:
    return (
        f"| {m.engine}{_star(m)} | {m.num_new_tokens} | {m.batch_size} | {m.wall_s:.2f} | "
        f"{m.tok_s:.1f} | {_num(m.decode_tok_s)} | {_num(m.prefill_s, 3)} |"
    )


def side_by_side(result: DecodeBenchResult) -> list[str]:
    """One row per length: each engine's tok/s, then kvlm's ratio to each baseline."""
    engines = result.engines()
    baselines = [e for e in engines if e != KVLM]
    lines = [
        "| new tokens | "
        + " | ".join(f"{e} tok/s" for e in engines)
        + "".join(f" | kvlm vs {b}" for b in baselines)
        + " |",
        "|---:|" + "---:|" * (len(engines) + len(baselines)),
    ]
    ratios = {(s.baseline, s.num_new_tokens): s.tok_s for s in result.speedups()}
    for n in result.config.new_tokens:
        found = [result.find(e, n) for e in engines]
        cells = ["–" if m is None else f"{m.tok_s:.1f}{_star(m)}" for m in found]
        cells += ["–" if (b, n) not in ratios else f"{ratios[b, n]:.2f}×" for b in baselines]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if any(m.interpolated_after is not None for m in result.measurements):
        c = result.config
        lines += [
            "",
            f"\\* every step timed up to {c.no_cache_max_tokens} tokens, then one step in "
            f"{c.no_cache_stride}, the steps between interpolated.",
        ]
    return lines


def _star(m: Measurement) -> str:
    return "" if m.interpolated_after is None else "*"


def per_token(result: DecodeBenchResult) -> list[str]:
    """Milliseconds per generated token near each length: flat with a cache, rising without."""
    traces = result.traces
    lines = [
        "| new tokens | " + " | ".join(f"{t.engine} ms/token" for t in traces) + " |",
        "|---:|" + "---:|" * len(traces),
    ]
    for n in result.config.new_tokens:
        cells = []
        for t in traces:
            if n <= len(t.step_s):
                cells.append(_num(t.step_ms_near(n)))
            else:  # past the fully timed run: the last sampled step, one step's time
                sampled = t.sampled_ms_at(n)
                cells.append("–" if sampled is None else f"{sampled:.1f}*")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: DecodeBenchResult) -> str:
    c, mi = result.config, result.machine
    cache = c.cache.label()
    lines = [
        f"## Decode benchmark: {c.model} ({c.dtype}, {c.weight_format} weights"
        f"{', kvlm ' + cache if cache else ''}), prompt "
        f"{c.prompt_tokens} tokens, batch {c.batch_size}, greedy, EOS ignored, median of "
        f"{c.repeats} run(s)",
        "",
        *side_by_side(result),
        "",
    ]
    if result.traces:
        lines += [
            "Time per token at the end of each length (median of the last 16 steps):",
            "",
            *per_token(result),
            "",
        ]
    lines += [
        "| engine | new tokens | batch | wall s | tok/s (total) | decode tok/s | prefill s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in c.new_tokens:
        lines += [_measurement_row(m) for m in result.measurements if m.num_new_tokens == n]
    speedups = result.speedups()
    if speedups:
        lines += [
            "",
            "| new tokens | kvlm vs | speedup (total tok/s) | speedup (decode tok/s) |",
            "|---:|---|---:|---:|",
        ]
        lines += [
            f"| {s.num_new_tokens} | {s.baseline} | {s.tok_s:.2f}× | "
            f"{_num(s.decode_tok_s, 2)}{'×' if s.decode_tok_s is not None else ''} |"
            for s in speedups
        ]
    lines += ["", machine_line(mi)]
    if mi.load_average is not None:
        end = result.load_average_end
        lines.append(
            f"Load average (1 min): {mi.load_average[0]:.2f} at start, "
            f"{'?' if end is None else f'{end[0]:.2f}'} at end. This run adds about "
            f"{mi.torch_num_threads}; more means other processes shared the "
            f"{mi.cpu_count} CPUs, making every number slower and noisier."
        )
    lines += [f"Note: {note}." for note in result.notes]
    lines += [f"Skipped {s.engine}: {s.reason}." for s in result.skipped]
    return "\n".join(lines)


def _measurement_json(m: Measurement) -> dict[str, Any]:
    return {
        "engine": m.engine,
        "new_tokens": m.num_new_tokens,
        "batch_size": m.batch_size,
        "wall_s": m.wall_s,
        "tok_s": m.tok_s,
        "decode_tok_s": m.decode_tok_s,
        "prefill_s": m.prefill_s,
        "interpolated_after": m.interpolated_after,
        # Each run's per-token times live once, in "traces", not in every length's copy.
        "runs": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "token_times_s"} for r in m.runs
        ],
    }


def to_json(result: DecodeBenchResult) -> dict[str, Any]:
    """Everything the run measured, plus the settings and machine, as plain JSON values."""
    return {
        "benchmark": "decode",
        "config": dataclasses.asdict(result.config),
        "machine": dataclasses.asdict(result.machine),
        "prompt_token_ids": result.prompt_token_ids,
        "results": [_measurement_json(m) for m in result.measurements],
        "speedups": [dataclasses.asdict(s) for s in result.speedups()],
        "traces": [dataclasses.asdict(t) for t in result.traces],
        "skipped": [dataclasses.asdict(s) for s in result.skipped],
        "notes": result.notes,
        "load_average_end": result.load_average_end,
    }
