"""PNG figures from the benchmarks' JSON (what `kvlm bench all` writes), with matplotlib.

Each function takes one benchmark's JSON object and writes one figure; nothing here runs a
model, so the figures can be redrawn from saved results. The Agg backend draws without a
display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from kvlm.bench.memory import MEASURED  # noqa: E402

SMOOTH_STEPS = 16  # per-token times are noisy: each point is the median of this many steps
JSON = dict[str, Any]


def _caption(data: JSON) -> str:
    m = data["machine"]
    threads = data.get("threads", m["torch_num_threads"])  # serve records the servers' own
    return f"{m['cpu_model']}, {m['cpu_count']} CPUs, threads: {threads}, {m['date']}"


def _save(fig: plt.Figure, path: Path, data: JSON) -> Path:
    fig.text(0.99, 0.005, _caption(data), ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _rolling_median(values: list[float], width: int) -> np.ndarray:
    x = np.asarray(values)
    if len(x) < width:
        return x
    windows = np.lib.stride_tricks.sliding_window_view(x, width)
    return np.concatenate([x[: width - 1], np.median(windows, axis=1)])


def decode_per_token(data: JSON, path: Path) -> Path:
    """Left: ms per generated token against its position; right: seconds to generate N."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for trace in data["traces"]:
        steps = trace["step_s"][1:]  # step 0 is the prefill; step i makes the token at p + i
        positions = trace["prompt_tokens"] + 1 + np.arange(len(steps))
        (line,) = left.plot(
            positions, 1000 * _rolling_median(steps, SMOOTH_STEPS), label=trace["engine"]
        )
        color = line.get_color()
        total = np.cumsum(trace["step_s"])
        right.plot(np.arange(1, len(total) + 1), total, color=color, label=trace["engine"])
        if trace["sampled"]:  # single steps timed past the fully timed run
            index, seconds = np.array(trace["sampled"]).T
            label = f"{trace['engine']}, sampled steps"
            left.plot(
                trace["prompt_tokens"] + index,
                1000 * seconds,
                "o--",
                markersize=3,
                color=color,
                label=label,
            )
            tail = np.arange(len(total), index[-1] + 1)
            cumulative = total[-1] + np.cumsum(np.interp(tail, index, seconds))
            right.plot(tail + 1, cumulative, "--", color=color, label=f"{label}, interpolated")
    left.set_yscale("log")
    left.set(
        xlabel="position in the sequence (tokens)",
        ylabel=f"ms per generated token, log scale (median of {SMOOTH_STEPS} steps)",
        title="Time per token: flat with a KV cache, growing without",
    )
    right.set(
        xlabel="tokens generated",
        ylabel="seconds since the request (prefill included)",
        title="Time to generate N tokens",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = data["config"]
    fig.suptitle(f"Decode, {c['model']} ({c['dtype']}), batch {c['batch_size']}, greedy")
    return _save(fig, path, data)


def ttft_vs_inter_token(data: JSON, path: Path) -> Path:
    """Each server's median TTFT against its median inter-token latency, one point per load."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for server in data["servers"]:
        rows = [r for r in data["results"] if r["server"] == server]
        x = [1000 * r["inter_token_s"]["p50"] for r in rows]
        y = [r["ttft_s"]["p50"] for r in rows]
        ax.plot(x, y, marker="o", label=server)
        for r, xi, yi in zip(rows, x, y, strict=True):
            n = r["num_streams"]
            ax.annotate(
                f"{n} stream{'s' if n > 1 else ''}",
                (xi, yi),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.set_xscale("log")  # log-log: light and heavy loads both stay readable
    ax.set_yscale("log")
    ax.margins(0.15)  # room for the labels of the outer points
    ax.set(
        xlabel="inter-token latency, median (ms, log scale)",
        ylabel="time to first token, median (s, log scale)",
        title="Latency under load: TTFT vs per-token latency",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path, data)


def throughput_vs_concurrency(data: JSON, path: Path, engine: JSON | None = None) -> Path:
    """Aggregate tok/s against concurrent streams, per server over HTTP; `engine` (the prefix
    benchmark's in-process runs) adds kvlm's engine without HTTP."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for server in data["servers"]:
        rows = [r for r in data["results"] if r["server"] == server]
        ax.plot(
            [r["num_streams"] for r in rows],
            [r["tok_s"] for r in rows],
            marker="o",
            label=f"{server} (HTTP)",
        )
    if engine is not None:
        rows = engine["streams"]
        ax.plot(
            [r["num_streams"] for r in rows],
            [r["tok_s"] for r in rows],
            marker="s",
            linestyle="--",
            label="kvlm engine (in-process, no HTTP)",
        )
    ax.set_xscale("log", base=2)
    streams = sorted({r["num_streams"] for r in data["results"]})
    ax.set_xticks(streams, labels=[str(n) for n in streams])
    ax.set(
        xlabel="concurrent streams",
        ylabel="aggregate generated tokens per second",
        title=f"Throughput vs concurrency ({data['config']['new_tokens']} tokens per stream)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, data)


def memory_vs_tokens(data: JSON, path: Path) -> Path:
    """KV MiB of one sequence against its length: lines calculated, markers measured. Log
    scale, so the small techniques stay apart; a dashed line keeps sinks visible beside the
    plain window."""
    fig, ax = plt.subplots(figsize=(8, 5))
    any_measured = False
    for technique in data["techniques"]:
        name = technique["name"]
        calc = [p for p in data["points"] if p["technique"] == name and p["source"] != MEASURED]
        measured = [p for p in data["points"] if p["technique"] == name and p["source"] == MEASURED]
        style = "--" if technique["num_sinks"] else "-"
        (line,) = ax.plot(
            [p["num_tokens"] for p in calc],
            [p["kv_bytes"] / 2**20 for p in calc],
            style,
            label=name,
        )
        if measured:
            any_measured = True
            ax.plot(
                [p["num_tokens"] for p in measured],
                [p["kv_bytes"] / 2**20 for p in measured],
                marker="o",
                linestyle="none",
                color=line.get_color(),
            )
    if any_measured:
        ax.plot([], [], marker="o", linestyle="none", color="0.3", label="measured (engine)")
    c = data["config"]
    ax.set_yscale("log")
    ax.set(
        xlabel="tokens in the sequence",
        ylabel="KV cache of one sequence (MiB, log scale)",
        title=f"KV memory by technique, {c['model']} (lines: calculator)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path, data)


def prefix_ttft(data: JSON, path: Path) -> Path:
    """TTFT against prefix length, cold and with the prefix cached."""
    fig, ax = plt.subplots(figsize=(7, 5))
    rows = data["prefixes"]
    x = [r["prefix_len"] for r in rows]
    ax.plot(x, [r["ttft_cold_s"] for r in rows], marker="o", label="cold (prefix computed)")
    ax.plot(x, [r["ttft_cached_s"] for r in rows], marker="o", label="prefix cached")
    ax.set(
        xlabel="shared prefix length (tokens)",
        ylabel="time to first token (s)",
        title="Prefix caching: TTFT with and without the cached prefix",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, data)
