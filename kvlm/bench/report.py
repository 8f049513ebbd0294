"""A decode benchmark's result as a markdown table, and as JSON with every raw number."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvlm.bench.decode import DecodeBenchResult, Measurement


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _measurement_row(m: Measurement) -> str:
    return (
        f"| {m.engine} | {m.num_new_tokens} | {m.batch_size} | {m.wall_s:.2f} | "
        f"{m.tok_s:.1f} | {_num(m.decode_tok_s)} | {_num(m.prefill_s, 3)} |"
    )


def markdown(result: DecodeBenchResult) -> str:
    c, mi = result.config, result.machine
    lines = [
        f"## Decode benchmark: {c.model} ({c.dtype}), prompt {c.prompt_tokens} tokens, "
        f"batch {c.batch_size}, greedy, EOS ignored, median of {c.repeats} run(s)",
        "",
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
    lines += ["", f"Machine: {mi.cpu_count} CPUs ({mi.cpu_model}), torch {mi.torch_version} "
              f"with {mi.torch_num_threads} threads, {mi.date}."]  # fmt: skip
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
        "runs": [dataclasses.asdict(r) for r in m.runs],
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
        "skipped": [dataclasses.asdict(s) for s in result.skipped],
        "notes": result.notes,
        "load_average_end": result.load_average_end,
    }
