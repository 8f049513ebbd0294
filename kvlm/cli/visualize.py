"""`kvlm visualize PROMPT`: replay one generation step by step in a self-contained HTML page
(and, with --png, a picture for the docs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvlm.cli import common
from kvlm.cli.common import (
    CLIError,
    add_model_options,
    add_sampling_options,
    check_engine_options,
    engine_kwargs,
    sampling_params,
)
from kvlm.cli.generate import read_prompt

DEFAULT_MAX_TOKENS = 32
DEFAULT_PREFILL_CHUNK = 32
DEFAULT_CHANNELS = 8


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "visualize",
        help="replay one generation's KV cache step by step in an HTML page",
        description="Generate for PROMPT and write a self-contained, offline HTML page that "
        "replays it step by step: the Key and Value caches of every layer growing (real values "
        "read back from the cache), blocks allocated, freed by a window, kept for sinks or "
        "reused from a cached prefix, the token text, and the work the cache saves.",
    )
    parser.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, default=Path("cache.html"), help="page (cache.html)")
    group.add_argument("--png", type=Path, default=None, help="also draw a PNG picture here")
    group.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N",
        help=f"prompt tokens computed per step ({DEFAULT_PREFILL_CHUNK})",
    )
    group.add_argument(
        "--cached-prefix",
        default=None,
        metavar="TEXT",
        help="run TEXT alone first, then visualize TEXT + PROMPT: its full blocks are reused",
    )
    group.add_argument(
        "--channels",
        type=int,
        default=DEFAULT_CHANNELS,
        metavar="C",
        help=f"K/V channels shown per layer ({DEFAULT_CHANNELS})",
    )
    add_model_options(parser)
    add_sampling_options(parser, max_tokens=DEFAULT_MAX_TOKENS)
    parser.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    if args.no_cache:
        raise CLIError("visualize shows the KV cache: drop --no-cache")
    if args.prefill_chunk < 1:
        raise CLIError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.channels < 1:
        raise CLIError(f"--channels must be >= 1, got {args.channels}")
    for option, path in (("--out", args.out), ("--png", args.png)):
        if path is not None and not path.parent.is_dir():
            raise CLIError(f"{option} {path}: the folder {path.parent} does not exist")


def _settings(args: argparse.Namespace, block_size: int) -> dict[str, str]:
    settings = {"block_size": str(block_size), "prefill_chunk": str(args.prefill_chunk)}
    if args.kv_cache_dtype != "auto":
        settings["kv_cache_dtype"] = args.kv_cache_dtype
    if args.sliding_window is not None:
        settings["sliding_window"] = str(args.sliding_window)
    if args.attention_sinks:
        settings["attention_sinks"] = str(args.attention_sinks)
    return settings


def run(args: argparse.Namespace) -> int:
    # matplotlib and the page writer load only for this command
    from kvlm.viz.page import write_page
    from kvlm.viz.plot import write_plot
    from kvlm.viz.recorder import record_generation

    prompt = read_prompt(args)
    params = sampling_params(args)
    _check(args)
    check_engine_options(args)
    llm = common.LLM(**engine_kwargs(args), max_num_batched_tokens=args.prefill_chunk)
    settings = _settings(args, llm.config.block_size)
    with tqdm(desc="visualize", unit="step", file=sys.stderr) as bar:
        recording = record_generation(
            llm.engine,
            prompt,
            params,
            settings,
            cached_prefix=args.cached_prefix,
            num_channels=args.channels,
            on_step=lambda step: bar.update(),
        )
    write_page(recording, args.out)
    if args.png is not None:
        write_plot(recording, args.png)
    steps = recording.steps
    num_prefill = sum(1 for s in steps if s.kind == "prefill")
    pairs_with = sum(s.with_cache.attention_pairs for s in steps)
    pairs_without = sum(s.without_cache.attention_pairs for s in steps)
    print(
        f"wrote {args.out}" + (f" and {args.png}" if args.png else "") + f": {len(steps)} steps "
        f"({num_prefill} prefill chunk(s) + {len(steps) - num_prefill} decode steps); "
        f"{pairs_with:,} query-key pairs with the cache, {pairs_without:,} without",
        file=sys.stderr,
    )
    return 0
