"""`kvlm bench decode`: time decoding with the KV cache against baselines, print a table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from kvlm.bench.decode import BASELINES, BenchConfigError, DecodeBenchConfig, run_decode_bench
from kvlm.bench.report import markdown, to_json
from kvlm.bench.serve import ServeBenchConfig, run_serve_bench
from kvlm.bench.serve import markdown as serve_markdown
from kvlm.cli.common import CLIError
from kvlm.engine.config import DTYPES, EngineConfig
from kvlm.loading import DEFAULT_MODEL


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like 32,128,512, got {text!r}") from e


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks", description="Benchmarks.")
    benches = parser.add_subparsers(title="benchmarks", dest="bench", required=True)
    decode = benches.add_parser(
        "decode",
        help="decode tok/s with the KV cache vs baselines",
        description="For each length N, generate exactly N greedy tokens (EOS ignored) from a "
        "fixed prompt with kvlm and with each baseline: no-cache (kvlm recomputing every step), "
        "hf (transformers on the same GGUF), llama.cpp (llama-cpp-python, if installed). "
        "Prints a markdown table; --json writes every raw number and the machine.",
    )
    decode.add_argument("--model", default=DEFAULT_MODEL, help="alias, .gguf file or HF folder")
    decode.add_argument(
        "--new-tokens", type=_int_list, default=(32, 128, 512), help="lengths, e.g. 32,128,512"
    )
    decode.add_argument(
        "--baselines",
        type=_name_list,
        default=("no-cache", "hf"),
        help=f"comma-separated, from {','.join(BASELINES)}; '' for none (default no-cache,hf)",
    )
    decode.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    decode.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens")
    decode.add_argument("--dtype", default="float32", choices=list(DTYPES))
    decode.add_argument("--repeats", type=int, default=1, help="timed runs per length (median)")
    decode.add_argument("--json", type=Path, default=None, metavar="F", help="write JSON to F")
    decode.set_defaults(run=run_decode)

    serve = benches.add_parser(
        "serve",
        help="continuous batching and prefix caching: tok/s by concurrency, TTFT with a hit",
        description="In-process serving workloads on one engine: aggregate generated tok/s with "
        "N concurrent streams, TTFT of a long-prefix request cold vs cached, prefix-cache hit "
        "rate over requests sharing that prefix, and KV waste (allocated, unwritten slots).",
    )
    serve.add_argument("--model", default=DEFAULT_MODEL, help="alias, .gguf file or HF folder")
    serve.add_argument("--dtype", default="float32", choices=list(DTYPES))
    serve.add_argument("--streams", type=_int_list, default=(1, 4, 16), help="e.g. 1,4,16")
    serve.add_argument("--new-tokens", type=int, default=64, help="tokens per stream")
    serve.add_argument("--prefix-tokens", type=int, default=1000, help="shared prefix length")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    serve.add_argument("--json", type=Path, default=None, metavar="F", help="write JSON to F")
    serve.set_defaults(run=run_serve)


def run_decode(args: argparse.Namespace) -> int:
    try:
        config = DecodeBenchConfig(
            model=args.model,
            new_tokens=args.new_tokens,
            baselines=args.baselines,
            batch_size=args.batch_size,
            prompt_tokens=args.prompt_tokens,
            dtype=args.dtype,
            repeats=args.repeats,
        )
        if args.json is not None and not args.json.parent.is_dir():
            raise CLIError(f"cannot write --json {args.json}: {args.json.parent} is not a folder")
        result = run_decode_bench(config, progress=lambda line: print(line, file=sys.stderr))
    except BenchConfigError as e:
        raise CLIError(str(e)) from e
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(result), indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    if not args.streams or min(args.streams) < 1 or args.new_tokens < 1 or args.prefix_tokens < 16:
        raise CLIError("--streams need values >= 1, --new-tokens >= 1 and --prefix-tokens >= 16")
    config = ServeBenchConfig(
        model=args.model,
        dtype=args.dtype,
        streams=args.streams,
        new_tokens=args.new_tokens,
        prefix_tokens=args.prefix_tokens,
        block_size=args.block_size,
    )
    EngineConfig(block_size=args.block_size)  # refuses a bad block size before loading
    result = run_serve_bench(config, progress=lambda line: print(line, file=sys.stderr))
    print(serve_markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
