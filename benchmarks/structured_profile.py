"""Where a 16-stream decode step's time goes with and without a JSON schema (issue 20).

    python benchmarks/structured_profile.py --model smollm2 --tokens 64 --threads 2

Same prompts and schema as `structured_speed.py`; the engine's pieces (forward, sampler,
mask application, waiting for the masks before the forward, the mask workers' own time, summed
over both lanes) are timed by wrapping them, over the pure decode steps of each batch, in ms
per step; then the CPU time each thread of the process used in those steps (the OpenMP worker
spinning between steps shows here).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from collections.abc import Callable

import structured_speed as speed

import kvlm.sampling.sampler as sampler_module
import kvlm.sampling.structured as structured_module
from kvlm import LLM


def _thread_cpu_ms() -> dict[str, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) * 1000 // os.sysconf("SC_CLK_TCK")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    llm = LLM(args.model, num_threads=args.threads, max_num_seqs=16)
    engine = llm.engine
    totals: collections.defaultdict[str, float] = collections.defaultdict(float)

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            out = fn(*a, **k)
            totals[name] += time.perf_counter() - start
            return out

        return wrapper

    engine.runner.run = timed("forward", engine.runner.run)
    engine.sampler = timed("sampler (with the mask)", engine.sampler)
    engine.structured.before_forward = timed("wait for masks", engine.structured.before_forward)
    engine.structured.masks = timed("gather masks", engine.structured.masks)
    sampler_module.RowMask.apply = timed("apply masks", sampler_module.RowMask.apply)
    structured_module.fill_mask = timed("mask workers (all lanes)", structured_module.fill_mask)
    llm.generate([speed.PROMPT], speed._params(8, True))  # warm-up, grammar compiled
    for name, kinds in {
        "16 streams": [False] * 16,
        "16 streams, JSON schema": [True] * 16,
        "16 streams, 8 + 8 mixed": [True, False] * 8,
    }.items():
        for kind in kinds:
            engine.add_request(speed.PROMPT, None, speed._params(args.tokens, kind))
        while engine.waiting_requests() or not all(
            r.output_token_ids for r in engine.running_requests()
        ):
            engine.step()
        totals.clear()
        cpu_before, steps, start = _thread_cpu_ms(), 0, time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        wall = time.perf_counter() - start
        cpu = {t: ms - cpu_before.get(t, 0) for t, ms in _thread_cpu_ms().items()}
        row = {"step": wall / steps * 1e3} | {k: v / steps * 1e3 for k, v in totals.items()}
        busy = sorted((ms for ms in cpu.values() if ms > 0), reverse=True)
        print(name, json.dumps({k: round(v, 2) for k, v in row.items()}))
        print(f"  thread CPU over {wall * 1e3:.0f} ms: {busy} ms")


if __name__ == "__main__":
    main()
