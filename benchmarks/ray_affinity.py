"""Prefix-affinity routing vs round-robin on Ray Serve, and 2 replicas x 1 thread vs 1 replica
x 2 threads (issue 22).

Workload: `--conversations` conversations of `--turns` turns over `--documents` shared
documents of `--doc-tokens` tokens (conversation c reads document c mod D). Each turn is one
streamed completion whose prompt is the document, the earlier questions and answers, and a
new question, so a turn shares its whole history with the previous turn of its conversation,
and its document with the other conversations on that document. `--concurrency` conversations
run at once; turns of one conversation run in order.

Runs, each on a fresh local Ray and Serve application (started by this script):
  prefix       --replicas replicas x 1 thread, prefix-affinity routing
  round_robin  the same replicas, round-robin routing
  one_replica  1 replica x --replicas threads, for aggregate tok/s against `prefix`

Reported per run: prefix hit rate (sum of usage.prompt_tokens_details.cached_tokens over sum
of prompt_tokens), mean and p50 TTFT (first text chunk), aggregate output tok/s (completion
tokens over the run's wall time) and how many requests each replica served.

    python benchmarks/ray_affinity.py --out benchmarks/ray-affinity-smollm2.json

Add `--kv-offload redis://HOST:PORT` to give the replicas the shared Redis tier (round-robin
then finds a document another replica evicted in Redis; a block reaches Redis only once a pool
evicts it). Timing figures need an idle machine: every replica and this client share the CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx

from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import load_tokenizer
from kvlm.loading import resolve_model_path
from kvlm.ray_serve import local
from kvlm.ray_serve.config import ServeAppConfig

WORDS = (  # noqa: SIM905 (a list literal would take one line per word)
    "cache block prefix token replica engine memory layer value key query attention batch "
    "window model request stream decode prefill vector weight tensor shard route ring hash "
    "queue thread core latency server client answer question document river mountain city "
    "garden winter summer light stone paper music number letter market harbour bridge"
).split()


@dataclass(frozen=True)
class Turn:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    replica: str


@dataclass(frozen=True)
class RunResult:
    name: str
    replicas: int
    threads_per_replica: int
    routing: str
    num_requests: int
    hit_rate: float
    mean_ttft_s: float
    p50_ttft_s: float
    output_tok_per_s: float
    prefill_tok_per_s_per_replica: float  # prompt tokens computed (not cached) / wall / replicas
    wall_s: float
    requests_per_replica: list[int]


def documents(model: str, count: int, num_tokens: int, seed: int) -> list[str]:
    """`count` texts of about `num_tokens` tokens each (random words, trimmed by the model's
    tokenizer)."""
    tokenizer = load_tokenizer(resolve_model_path(model))
    rng = random.Random(seed)
    texts = []
    for d in range(count):
        words = [f"Document {d}."]
        while len(tokenizer.encode(" ".join(words))) < num_tokens:
            words.extend(rng.choice(WORDS) for _ in range(32))
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:num_tokens]
        texts.append(tokenizer.decode(ids))
    return texts


async def conversation(
    client: httpx.AsyncClient, args: argparse.Namespace, document: str, c: int
) -> list[Turn]:
    history, turns = document, []
    for t in range(args.turns):
        history += f"\n\nQuestion {t + 1} of reader {c}: what does the text say about it?\nAnswer:"
        body = {
            "model": args.model,
            "prompt": history,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent, first, text, usage = time.perf_counter(), None, [], None
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
            replica = response.headers["x-kvlm-replica"]
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if event.get("choices") and event["choices"][0]["text"]:
                    first = first or time.perf_counter()
                    text.append(event["choices"][0]["text"])
                usage = event.get("usage") or usage
        assert first is not None and usage is not None, "a turn streamed no text or no usage"
        history += "".join(text)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        turns.append(
            Turn(first - sent, usage["prompt_tokens"], cached, usage["completion_tokens"], replica)
        )
    return turns


async def workload(url: str, args: argparse.Namespace, docs: list[str]) -> tuple[list[Turn], float]:
    gate = asyncio.Semaphore(args.concurrency)

    async def one(c: int) -> list[Turn]:
        async with gate:
            return await conversation(client, args, docs[c % len(docs)], c)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(c) for c in range(args.conversations)))
        wall = time.perf_counter() - start
    return [turn for turns in results for turn in turns], wall


def run(name: str, args: argparse.Namespace, docs: list[str], replicas: int, threads: int,
        routing: str) -> RunResult:  # fmt: skip
    engine = EngineConfig(
        model=args.model,
        num_threads=threads,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        kv_offload=args.kv_offload,
    )
    config = ServeAppConfig(
        engine=engine,
        served_model_name=args.model,
        num_replicas=replicas,
        replica_cpus=threads,
        routing=routing,
        max_imbalance=args.max_imbalance,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = local.start(config, "127.0.0.1", port)
    try:
        turns, wall = asyncio.run(workload(url, args, docs))
    finally:
        local.stop()
    ttfts = [t.ttft_s for t in turns]
    served = Counter(t.replica for t in turns)
    return RunResult(
        name=name,
        replicas=replicas,
        threads_per_replica=threads,
        routing=routing,
        num_requests=len(turns),
        hit_rate=sum(t.cached_tokens for t in turns) / sum(t.prompt_tokens for t in turns),
        mean_ttft_s=statistics.fmean(ttfts),
        p50_ttft_s=statistics.median(ttfts),
        output_tok_per_s=sum(t.completion_tokens for t in turns) / wall,
        prefill_tok_per_s_per_replica=sum(t.prompt_tokens - t.cached_tokens for t in turns)
        / wall
        / replicas,
        wall_s=wall,
        requests_per_replica=sorted(served.values(), reverse=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--doc-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length per turn")
    parser.add_argument("--concurrency", type=int, default=8, help="conversations at once")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-memory", default="256MiB", help="per replica")
    parser.add_argument("--kv-offload", default=None, help="e.g. redis://127.0.0.1:6379")
    parser.add_argument(
        "--max-imbalance", type=int, default=4, help="prefix routing's busy threshold (4)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="prefix,round_robin,one_replica")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    docs = documents(args.model, args.documents, args.doc_tokens, args.seed)
    plans = {
        "prefix": (args.replicas, 1, "prefix"),
        "round_robin": (args.replicas, 1, "round_robin"),
        "one_replica": (1, args.replicas, "prefix"),
    }
    results = []
    for name in args.runs.split(","):
        if name not in plans:
            parser.error(f"unknown run {name!r}: choose from {', '.join(plans)}")
        results.append(run(name, args, docs, *plans[name]))
        r = results[-1]
        print(
            f"{r.name:12} {r.replicas} x {r.threads_per_replica} thread(s), {r.routing:11}: "
            f"hit rate {r.hit_rate:.1%}, TTFT mean {r.mean_ttft_s * 1000:.0f} ms "
            f"(p50 {r.p50_ttft_s * 1000:.0f}), {r.output_tok_per_s:.1f} output tok/s, "
            f"{r.prefill_tok_per_s_per_replica:.0f} prefill tok/s per replica, "
            f"requests per replica {r.requests_per_replica}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
