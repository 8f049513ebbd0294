"""Decode and prefill speed of each KV format at a context depth: kvlm beside llama.cpp's
matching cache type.

For each model, depth and format, kvlm decodes 64 greedy tokens at batch 1 after a prompt of
DEPTH tokens (`kvlm bench decode --kv-cache-dtype F --prompt-tokens DEPTH`), and llama.cpp
generates 64 tokens at the same depth with the same GGUF and threads (`llama-bench -fa 1
-ctk T -ctv T -d DEPTH -n 64 -p 0`). Plus kvlm with a sliding window and sinks. A second table
gives the prefill of that DEPTH-token prompt: kvlm's (DEPTH / its time to the first token, the
same runs) beside llama.cpp's `ppDEPTH` (`llama-bench -fa 1 -ctk T -ctv T -p DEPTH -n 0`). Every
engine in one run, so compare only within it.

    python benchmarks/kv_formats.py --threads 2 [--llama-bench PATH] [--depths 512,4096]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvlm.bench.machine import machine_info
from kvlm.loading import resolve_model_path

FORMATS = {"float16": "f16", "int8": "q8_0", "int4": "q4_0"}  # kvlm name -> llama.cpp type
LLAMA_DIRS = [Path.home() / ".cache" / d for d in ("kvlm-llamacpp-native", "kvlm-llamacpp")]
NEW_TOKENS = 64


def kvlm_decode(model: str, depth: int, threads: int, cache: list[str]) -> tuple[float, float]:
    """kvlm's decode tok/s after `depth` prompt tokens and its prefill tok/s for them (median of
    2 runs; the prefill time runs to the first token)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = ["kvlm", "bench", "decode", "--model", model, "--threads", str(threads)]
        argv += ["--baselines", "", "--new-tokens", str(NEW_TOKENS), "--repeats", "2"]
        argv += ["--prompt-tokens", str(depth), "--json", out.name, *cache]
        subprocess.run(argv, check=True, capture_output=True)
        (result,) = json.loads(Path(out.name).read_text())["results"]
    return result["decode_tok_s"], depth / result["prefill_s"]


def llama_bench(binary: Path, gguf: Path, cache_type: str, threads: int, test: list[str]) -> float:
    """tok/s of one llama-bench test (`-d D -n 64 -p 0`: decode at depth; `-p D -n 0`: prefill)."""
    argv = [str(binary), "-m", str(gguf), "-fa", "1", "-ctk", cache_type, "-ctv", cache_type]
    argv += [*test, "-t", str(threads), "-r", "2", "-o", "json"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    (row,) = json.loads(out)
    return row["avg_ts"]


def find_llama_bench(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    for folder in LLAMA_DIRS:
        if (folder / "llama-bench").exists():
            return folder / "llama-bench"
    found = shutil.which("llama-bench")
    return Path(found) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3-270m")
    parser.add_argument("--depths", default="512,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-bench", type=Path, default=None)
    parser.add_argument("--window", type=int, default=1024, help="window of the window+sinks row")
    args = parser.parse_args()
    binary = find_llama_bench(args.llama_bench)
    depths = [int(d) for d in args.depths.split(",")]
    lines = [
        "| model | KV cache | depth | kvlm tok/s | llama.cpp tok/s | ratio | vs kvlm float16 |"
    ]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    prefill = [
        "| model | KV cache | prompt tokens | kvlm prefill tok/s | llama.cpp pp tok/s | ratio |"
    ]
    prefill.append("|---|---|---:|---:|---:|---:|")
    for model in args.models.split(","):
        gguf = resolve_model_path(model)
        for depth in depths:
            plain = None
            for fmt, cache_type in FORMATS.items():
                ours, ours_pp = kvlm_decode(model, depth, args.threads, ["--kv-cache-dtype", fmt])
                plain = ours if fmt == "float16" else plain
                decode_test = ["-d", str(depth), "-n", str(NEW_TOKENS), "-p", "0"]
                theirs, theirs_pp = (
                    (None, None)
                    if binary is None
                    else (
                        llama_bench(binary, gguf, cache_type, args.threads, decode_test),
                        llama_bench(
                            binary, gguf, cache_type, args.threads, ["-p", str(depth), "-n", "0"]
                        ),
                    )
                )
                ratio = "" if theirs is None else f"{ours / theirs:.2f}×"
                other = "—" if theirs is None else f"{theirs:.1f}"
                rel = f"{ours / plain:.2f}×"
                lines.append(
                    f"| {model} | {fmt} ({cache_type}) | {depth} | {ours:.1f} | {other} | "
                    f"{ratio} | {rel} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
                pp_ratio = "" if theirs_pp is None else f"{ours_pp / theirs_pp:.2f}×"
                pp_other = "—" if theirs_pp is None else f"{theirs_pp:.1f}"
                prefill.append(
                    f"| {model} | {fmt} ({cache_type}) | {depth} | {ours_pp:.1f} | {pp_other} | "
                    f"{pp_ratio} |"
                )
                print(prefill[-1], file=sys.stderr, flush=True)
            window = ["--sliding-window", str(args.window), "--attention-sinks", "4"]
            ours, _ = kvlm_decode(model, depth, args.threads, window)
            full, full_pp = kvlm_decode(model, depth, args.threads, [])
            prefill.append(f"| {model} | default (float32) | {depth} | {full_pp:.1f} | | |")
            lines.append(
                f"| {model} | default, window {args.window} + 4 sinks | {depth} | {ours:.1f} | "
                f"| | {ours / full:.2f}× the default cache ({full:.1f}) |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    info = machine_info()
    print("\n".join(lines))
    print()
    print("\n".join(prefill))
    print(
        f"\n{info.cpu_model}; flags {', '.join(info.cpu_flags)}; {args.threads} threads; "
        f"llama-bench: {binary or 'not found'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
