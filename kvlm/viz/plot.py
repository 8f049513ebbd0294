"""A still picture of a recording for the docs (matplotlib, PNG): K and V of a few layers as
they stand at the end, the work done with and without the cache step by step, and the blocks
each layer group holds."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kvlm.viz.recorder import Recording

_NUM_LAYERS_SHOWN = 3


def _matrix(rows: list[list[float] | None], num_channels: int) -> np.ndarray:
    """[num_tokens, num_channels]; NaN where K/V came from the prefix cache."""
    return np.array([row if row is not None else [np.nan] * num_channels for row in rows])


def _cumulative(counts: Iterable[int]) -> np.ndarray:
    """Running totals; NaN while still 0 (a log axis cannot show it: no-cache work starts
    only at the first step that yields a token)."""
    totals = np.array(list(accumulate(counts)), dtype=np.float64)
    return np.where(totals > 0, totals, np.nan)


def write_plot(recording: Recording, path: Path) -> None:
    num_layers = len(recording.keys)
    layers = sorted({0, num_layers // 2, num_layers - 1})[:_NUM_LAYERS_SHOWN]
    fig = Figure(figsize=(14, 9), dpi=110, layout="constrained")  # no pyplot: no display
    grid = fig.add_gridspec(2, 2 * len(layers), height_ratios=[1.25, 1])
    channels = recording.channels
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d1fae5")  # NaN: reused prefix
    image = None
    for i, layer in enumerate(layers):
        for j, (name, rows) in enumerate((("K", recording.keys), ("V", recording.values))):
            ax = fig.add_subplot(grid[0, 2 * i + j])
            m = _matrix(rows[layer], len(channels))
            scale = float(np.nanmax(np.abs(m))) or 1.0
            image = ax.imshow(
                m / scale, aspect="auto", cmap=cmap, vmin=-1, vmax=1, interpolation="nearest"
            )
            ax.set_title(f"layer {layer}: {name}")
            ax.set_xlabel(f"channel (head {recording.kv_head})")
            ax.set_xticks(range(len(channels)), [str(c) for c in channels], fontsize=7)
            if i == 0 and j == 0:
                ax.set_ylabel("token position")
            ax.axhline(recording.num_prompt_tokens - 0.5, color="black", lw=0.8, ls="--")
    assert image is not None
    bar = fig.colorbar(image, ax=fig.axes, location="right", shrink=0.5)
    bar.set_label("value / layer's largest |value|")

    steps = recording.steps
    x = np.arange(1, len(steps) + 1)
    ax = fig.add_subplot(grid[1, : len(layers)])
    pairs_with = _cumulative(s.with_cache.attention_pairs for s in steps)
    pairs_without = _cumulative(s.without_cache.attention_pairs for s in steps)
    proj_with = _cumulative(s.with_cache.kv_projections for s in steps)
    proj_without = _cumulative(s.without_cache.kv_projections for s in steps)
    ax.plot(x, pairs_without, color="tab:red", label="attention pairs, no cache")
    ax.plot(x, pairs_with, color="tab:blue", label="attention pairs, with the cache")
    ax.plot(x, proj_without, color="tab:red", ls="--", label="K/V projections, no cache")
    ax.plot(x, proj_with, color="tab:blue", ls="--", label="K/V projections, with the cache")
    ax.set_yscale("log")
    ax.set_xlabel("engine step (prefill chunks, then one decode step per token)")
    ax.set_ylabel("work so far (count, log scale)")
    ax.set_title(
        f"Work: {int(pairs_without[-1]):,} vs {int(pairs_with[-1]):,} query-key pairs "
        f"({pairs_without[-1] / pairs_with[-1]:.1f}x fewer with the cache)"
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(grid[1, len(layers) :])
    for g, group in enumerate(recording.groups):
        held = [sum(1 for b in s.tables_after[g] if b) for s in steps]
        ax.step(x, held, where="post", label=f"group {g}: {group.label}")
    ax.set_xlabel("engine step")
    ax.set_ylabel(f"blocks held ({recording.groups[0].block_size} tokens each)")
    ax.set_title("Blocks held by the request")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    settings = ", ".join(f"{k} {v}" for k, v in recording.settings.items())
    reused = ", green rows: K/V reused from the prefix cache" if recording.num_cached_tokens else ""
    fig.suptitle(
        f"kvlm visualize · {recording.model}"
        + (f" · {settings}" if settings else "")
        + f" · {recording.num_prompt_tokens} prompt + "
        f"{len(recording.token_ids) - recording.num_prompt_tokens} generated tokens\n"
        f"K and V of KV head {recording.kv_head}, channels {recording.channels[0]}-"
        f"{recording.channels[-1]} (dashed line: end of the prompt{reused})"
    )
    fig.savefig(path)
