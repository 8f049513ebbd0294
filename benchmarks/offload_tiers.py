"""Offload tiers: hit rate and load time per tier, and what a tier hit saves over recomputing.

Workload: --num-prefixes distinct documents of --prefix-tokens tokens, each asked a short
question twice (two passes). The pool holds only about --pool-prefixes documents, so by the
second pass most documents were evicted: without tiers they are recomputed; with tiers their
blocks come back. Runs, each in a fresh engine:
  none        no tiers (the recompute baseline)
  ram, disk, redis   one tier alone, big enough for everything
  hierarchy   ram + disk + redis, RAM and disk each sized for about a third of the blocks,
              so hits spread over the three tiers
Redis: --redis URL, or a redis-server started on a free loopback port when the binary is
installed (the run is skipped otherwise). Prints a JSON line per run and a Markdown table.

    python benchmarks/offload_tiers.py --model smollm2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from kvlm import LLM
from kvlm.kv.offload.tier import TierSnapshot
from kvlm.kv.spec import layer_groups
from kvlm.loading import resolve_model_path
from kvlm.loading.gguf_loader import read_header
from kvlm.sampling import SamplingParams


@contextmanager
def local_redis(url: str | None) -> Iterator[str | None]:
    """`url`, or a throwaway redis-server (no persistence); None when neither is available."""
    binary = shutil.which("redis-server")
    if url is not None or binary is None:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def documents(num: int, num_tokens: int) -> list[list[int]]:
    """Distinct token sequences (ids from the middle of the vocabulary, no special tokens)."""
    return [[1000 + (d * 7919 + i * 31) % 20000 for i in range(num_tokens)] for d in range(num)]


def run(args: argparse.Namespace, name: str, kv_offload: str | None) -> dict:
    llm = LLM(
        args.model,
        num_threads=args.threads,
        max_model_len=args.prefix_tokens + 64,
        kv_cache_memory=args.pool_bytes,
        kv_offload=kv_offload,
    )
    offload = llm.engine.offload
    block_bytes = sum(s.page_nbytes for s in llm.engine.kv_specs)
    question = list(range(500, 516))
    params = SamplingParams(max_tokens=1, temperature=0)
    second_pass = []
    try:
        for pass_ in range(2):
            if pass_ == 1:  # count the second pass only: the first one can only miss
                before = {t.name: t for t in offload.snapshot()} if offload else {}
            for doc in documents(args.num_prefixes, args.prefix_tokens):
                out = llm.generate({"prompt_token_ids": doc + question}, params)[0]
                if pass_ == 1:
                    second_pass.append((out.metrics.ttft_s, out.metrics.num_cached_tokens))
            if offload is not None:
                offload.flush()
        tiers = [_minus(t, before[t.name]) for t in offload.snapshot()] if offload else []
    finally:
        llm.engine.close()
    result = {
        "run": name,
        "kv_offload": kv_offload,
        "second_pass_ttft_s": statistics.median(t for t, _ in second_pass),
        "second_pass_cached_tokens": sum(c for _, c in second_pass),
        "tiers": [
            {
                "tier": t.name,
                "hit_rate": t.hits / max(t.hits + t.misses, 1),
                "hits": t.hits,
                "misses": t.misses,
                "stores": t.stores,
                "failures": t.failures,
                "load_ms_per_block": 1e3 * t.load_seconds / max(t.hits, 1),
                "load_mb_s": t.bytes_loaded / max(t.load_seconds, 1e-9) / 1e6,
                "block_bytes": block_bytes,
            }
            for t in tiers
        ],
    }
    print(json.dumps(result), flush=True)
    return result


def _minus(after: TierSnapshot, before: TierSnapshot) -> TierSnapshot:
    fields = ("hits", "misses", "stores", "failures", "bytes_stored", "bytes_loaded")
    delta = {f: getattr(after, f) - getattr(before, f) for f in fields}
    return TierSnapshot(after.name, **delta, load_seconds=after.load_seconds - before.load_seconds)


def _rate(tier: dict) -> str:
    return f"{tier['hit_rate']:.0%}" if tier["hits"] + tier["misses"] else "no lookups"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--pool-prefixes", type=float, default=2.5, help="pool size in documents")
    parser.add_argument("--redis", default=None, help="redis://HOST:PORT (default: start one)")
    args = parser.parse_args()

    config, _ = read_header(resolve_model_path(args.model))
    per_token = sum(s.bytes_per_token for s in layer_groups(config, 16, "float32"))
    doc_bytes = per_token * (args.prefix_tokens + 64)
    args.pool_bytes = int(doc_bytes * args.pool_prefixes)
    everything = doc_bytes * args.num_prefixes * 2
    third = doc_bytes * args.num_prefixes // 3
    results = []
    with tempfile.TemporaryDirectory() as tmp, local_redis(args.redis) as redis_url:
        runs = [
            ("none", None),
            ("ram", f"ram:{everything}"),
            ("disk", f"disk:{tmp}/disk:{everything}"),
        ]
        if redis_url is not None:
            runs += [
                ("redis", redis_url),
                ("hierarchy", f"ram:{third},disk:{tmp}/hier:{third},{redis_url}"),
            ]
        else:
            print("# redis runs skipped: no --redis and no redis-server binary")
        for name, spec in runs:
            if redis_url is not None and name in ("redis", "hierarchy"):
                redis.Redis.from_url(redis_url).flushall()  # no blocks from an earlier run
            results.append(run(args, name, spec))
    print(
        f"\n{args.model}, {args.num_prefixes} documents of {args.prefix_tokens} tokens, pool "
        f"of {args.pool_prefixes} documents; second pass (after eviction):"
    )
    print("| run | tier | hit rate | load ms/block | load MB/s | median TTFT | cached tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ttft = f"{r['second_pass_ttft_s'] * 1e3:.0f} ms"
        cached = r["second_pass_cached_tokens"]
        for t in r["tiers"] or [None]:
            if t is None:
                print(f"| {r['run']} | - | - | - | - | {ttft} | {cached:,} |")
                continue
            print(
                f"| {r['run']} | {t['tier']} | {_rate(t)} | "
                f"{t['load_ms_per_block']:.2f} | {t['load_mb_s']:.0f} | {ttft} | {cached:,} |"
            )


if __name__ == "__main__":
    main()
