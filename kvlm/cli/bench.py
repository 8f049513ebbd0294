"""`kvlm bench`: decode, serve, prefix and memory benchmarks, and `all` of them with plots.

Each prints markdown tables to stdout, progress to stderr, and with --json writes every raw
number beside the settings and the machine (CPU model and flags, threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvlm.bench import memory, prefix, report, serve
from kvlm.bench.backends import KVCacheOptions
from kvlm.bench.common import BenchConfigError
from kvlm.bench.decode import run_decode_bench
from kvlm.bench.decode_data import BASELINES, DecodeBenchConfig
from kvlm.bench.memory import MemoryBenchConfig
from kvlm.bench.prefix import PrefixBenchConfig
from kvlm.bench.serve import SERVE_BASELINES, ServeBenchConfig
from kvlm.cli.common import CLIError
from kvlm.cli.press import add_kv_press_option, kv_press
from kvlm.engine.config import DTYPES, KV_CACHE_DTYPES
from kvlm.engine.weight_format import AUTO, WEIGHT_FORMAT_CHOICES
from kvlm.loading import DEFAULT_MODEL


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like 32,128,512, got {text!r}") from e


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _progress(line: str) -> None:
    print(line, file=sys.stderr)


def _common(parser: argparse.ArgumentParser, json_file: bool = True) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, .gguf file or HF folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every engine (default: one per core); recorded in the JSON",
    )
    if json_file:
        parser.add_argument("--json", type=Path, default=None, metavar="F", help="write JSON to F")


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument(
        "--weight-format",
        default=AUTO,
        choices=list(WEIGHT_FORMAT_CHOICES),
        help="how kvlm holds linear weights; default auto: gguf for a .gguf model on a CPU with "
        "kvlm's AVX2 / AVX-512 kernels, else float (the tables and JSON name the one that ran)",
    )


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks", description=__doc__)
    benches = parser.add_subparsers(title="benchmarks", dest="bench", required=True)

    decode = benches.add_parser(
        "decode",
        help="decode tok/s with the KV cache vs baselines, time per token vs position",
        description="For each length N, generate exactly N greedy tokens (EOS ignored) from a "
        "fixed prompt with kvlm and with each baseline: no-cache (kvlm recomputing every step, "
        "up to --no-cache-max-tokens), hf (transformers on the same GGUF), llama.cpp "
        "(llama-cpp-python on the same file, if installed). One run of the longest length "
        "gives every shorter one and the time of each token.",
    )
    _common(decode)
    _engine_options(decode)
    decode.add_argument(
        "--new-tokens", type=_int_list, default=(32, 128, 512, 1024), help="e.g. 32,128,512,1024"
    )
    decode.add_argument(
        "--baselines",
        type=_name_list,
        default=("no-cache", "hf"),
        help=f"comma-separated, from {','.join(BASELINES)}; '' for none (default no-cache,hf)",
    )
    decode.add_argument(
        "--no-cache-max-tokens",
        type=int,
        default=512,
        help="longest length the no-cache baseline runs (its cost grows with the square)",
    )
    decode.add_argument(
        "--no-cache-stride",
        type=int,
        default=32,
        help="past --no-cache-max-tokens, time one no-cache step in this many and interpolate "
        "the rest (0: do not run those lengths without the cache)",
    )
    decode.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    decode.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens")
    decode.add_argument("--repeats", type=int, default=1, help="timed runs (median)")
    decode.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=list(KV_CACHE_DTYPES),
        help="kvlm's KV format (auto: the compute dtype)",
    )
    decode.add_argument("--sliding-window", type=int, default=None, help="kvlm's window, tokens")
    decode.add_argument("--attention-sinks", type=int, default=0, help="sinks beside the window")
    add_kv_press_option(decode, "kvlm's prompts are pressed before they decode")
    decode.set_defaults(run=run_decode)

    srv = benches.add_parser(
        "serve",
        help="over HTTP: tok/s vs concurrency, TTFT and inter-token latency percentiles",
        description="Start `kvlm serve` (and each baseline server) on the same GGUF and "
        "threads, and send N streamed completions at once with one client for each N; reports "
        "aggregate tok/s and TTFT and inter-token p50/p90/p99 per server.",
    )
    _common(srv)
    _engine_options(srv)
    srv.add_argument("--streams", type=_int_list, default=(1, 4, 16, 64), help="e.g. 1,4,16,64")
    srv.add_argument("--new-tokens", type=int, default=64, help="tokens per stream")
    srv.add_argument(
        "--baselines",
        type=_name_list,
        default=(),
        help=f"comma-separated, from {','.join(SERVE_BASELINES)} (default none)",
    )
    srv.add_argument(
        "--llama-server", type=Path, default=None, help="the llama-server binary to run"
    )
    srv.set_defaults(run=run_serve)

    pre = benches.add_parser(
        "prefix",
        help="TTFT with and without a cached shared prefix, hit rate, KV waste (in-process)",
        description="On one in-process engine: TTFT of a long-prefix request cold vs cached "
        "for each prefix length, the prefix-cache hit rate over requests sharing the longest, "
        "aggregate tok/s of N concurrent streams, and KV waste (allocated, unwritten slots).",
    )
    _common(pre)
    _engine_options(pre)
    pre.add_argument("--prefix-tokens", type=_int_list, default=(256, 512, 1000), help="lengths")
    pre.add_argument("--streams", type=_int_list, default=(1, 4, 16), help="e.g. 1,4,16")
    pre.add_argument("--new-tokens", type=int, default=64, help="tokens per stream")
    pre.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    pre.set_defaults(run=run_prefix)

    mem = benches.add_parser(
        "memory",
        help="KV bytes vs tokens: plain, GQA vs multi-head, window, sinks, int8, int4",
        description="KV bytes of one sequence against its length for each technique, from the "
        "calculator (kvlm memory), with points measured by the engine (kv_peak_bytes).",
    )
    _common(mem)
    mem.add_argument("--max-tokens", type=int, default=8192, help="the curve's last length")
    mem.add_argument(
        "--measured-tokens", type=_int_list, default=(256, 1024, 2048), help="'' for none"
    )
    mem.add_argument("--window", type=int, default=512, help="sliding window in tokens")
    mem.add_argument("--sinks", type=int, default=4, help="attention sinks beside the window")
    mem.set_defaults(run=run_memory)

    every = benches.add_parser(
        "all",
        help="every benchmark, JSON, tables and PNG plots into --out",
        description="Run decode (with no-cache, hf and llama.cpp), serve (with llama-server), "
        "prefix and memory at sizes that finish in under 20 minutes on an idle 2-core "
        "machine, then write DIR/<name>.json, DIR/<name>.md, the PNG figures and "
        "DIR/suite.json. Missing baselines are skipped with a line saying so.",
    )
    _common(every, json_file=False)
    _engine_options(every)
    every.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    every.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes: checks the setup and baselines in about a minute (numbers meaningless)",
    )
    every.set_defaults(run=run_all)


def _write(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        _progress(f"wrote {path}")


def _check_json_path(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise CLIError(f"cannot write --json {path}: {path.parent} is not a folder")


def _run(args: argparse.Namespace, make: Callable[[], Any], run: Callable, module: Any) -> int:
    """Build the config (bad values become CLIError), run, print the tables, write JSON."""
    try:
        config = make()
    except BenchConfigError as e:
        raise CLIError(str(e)) from e
    _check_json_path(args.json)
    try:
        result = run(config, _progress)
    except BenchConfigError as e:
        raise CLIError(str(e)) from e
    print(module.markdown(result))
    _write(args.json, module.to_json(result))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    def make() -> DecodeBenchConfig:
        return DecodeBenchConfig(
            model=args.model,
            new_tokens=args.new_tokens,
            baselines=args.baselines,
            batch_size=args.batch_size,
            prompt_tokens=args.prompt_tokens,
            dtype=args.dtype,
            repeats=args.repeats,
            threads=args.threads,
            no_cache_max_tokens=args.no_cache_max_tokens,
            no_cache_stride=args.no_cache_stride,
            weight_format=args.weight_format,
            cache=KVCacheOptions(
                args.kv_cache_dtype,
                args.sliding_window,
                args.attention_sinks,
                kv_press(args.kv_press),
            ),
        )

    return _run(args, make, run_decode_bench, report)


def run_serve(args: argparse.Namespace) -> int:
    def make() -> ServeBenchConfig:
        return ServeBenchConfig(
            model=args.model,
            dtype=args.dtype,
            weight_format=args.weight_format,
            streams=args.streams,
            new_tokens=args.new_tokens,
            baselines=args.baselines,
            threads=args.threads,
            llama_server=args.llama_server,
        )

    return _run(args, make, serve.run_serve_bench, serve)


def run_prefix(args: argparse.Namespace) -> int:
    def make() -> PrefixBenchConfig:
        return PrefixBenchConfig(
            model=args.model,
            dtype=args.dtype,
            weight_format=args.weight_format,
            streams=args.streams,
            new_tokens=args.new_tokens,
            prefix_tokens=args.prefix_tokens,
            block_size=args.block_size,
            threads=args.threads,
        )

    return _run(args, make, prefix.run_prefix_bench, prefix)


def run_memory(args: argparse.Namespace) -> int:
    def make() -> MemoryBenchConfig:
        return MemoryBenchConfig(
            model=args.model,
            max_tokens=args.max_tokens,
            measured_tokens=args.measured_tokens,
            window=args.window,
            sinks=args.sinks,
            threads=args.threads,
        )

    return _run(args, make, memory.run_memory_bench, memory)


def run_all(args: argparse.Namespace) -> int:
    from kvlm.bench.suite import default_suite, estimate_s, run_suite  # loads matplotlib

    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} is a file, not a folder")
    try:
        suite = default_suite(args.model, args.threads, args.weight_format, args.dtype, args.smoke)
    except BenchConfigError as e:
        raise CLIError(str(e)) from e
    estimate = estimate_s(suite)
    parts = ", ".join(f"{name} {s / 60:.1f}" for name, s in estimate.items())
    _progress(
        f"estimated {sum(estimate.values()) / 60:.0f} min on an idle 2-core machine "
        f"({parts} min); longer when other work shares the CPUs"
    )
    start = time.perf_counter()
    summary = run_suite(suite, args.out, _progress)
    for name in summary["elapsed_s"]:
        print((args.out / f"{name}.md").read_text())
    _progress(f"done in {(time.perf_counter() - start) / 60:.1f} min; files in {args.out}:")
    _progress("  " + " ".join(summary["files"]))
    return 0
