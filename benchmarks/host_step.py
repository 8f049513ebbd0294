"""Host work per decode step: `ModelRunner.prepare` at 512 and 8,192 tokens of context.

Issue 18 asks that the host's share of a step be the same at 8,192 tokens as at 512. This
times `prepare` (block tables from the persistent batch state, positions, write rows: what
the paged kernels and the fused decode read) for batch 1 and 16, next to the same step built
for the torch reference (a gather index of every key and a mask, which grow with context).
Beside it, the paged C++ kernel's checks of those inputs for the step's 30 layers: repeated
in every layer's call (`check_lengths` / `check_values`, as one `paged_attention` call does)
against once per step (`paged.StepKernel`, what the runner hands the layers).
The sequences grow by one token per step, as in decoding, so a block is appended every
`block_size` steps. No model runs: the runner is given SmolLM2-135M's cache layout (30 layers,
3 KV heads of 64, blocks of 16) and pools that are never written (zero pages cost no memory).

    python benchmarks/host_step.py [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from kvlm.attention.context import ForwardContext
from kvlm.engine.request import Request
from kvlm.engine.runner import ModelRunner
from kvlm.engine.scheduler import ScheduledBatch
from kvlm.kernels import paged
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.store import KVStore
from kvlm.sampling import SamplingParams

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 16  # SmolLM2-135M
CPU = torch.device("cpu")


def _runner(num_blocks: int, paged: bool) -> ModelRunner:
    specs = (KVCacheSpec(tuple(range(NUM_LAYERS)), NUM_KV_HEADS, HEAD_DIM, BLOCK, "float32"),)
    cache = KVCacheManager(specs, [num_blocks], enable_prefix_caching=False)
    stores = [KVStore(specs[0], num_blocks, torch.float32, CPU)]
    model = SimpleNamespace(config=SimpleNamespace(num_layers=NUM_LAYERS))
    runner = ModelRunner(model, CPU, specs, stores, cache)  # type: ignore[arg-type]
    if not paged:
        runner.paged_attention = None
    return runner


def _checks_per_layer(ctx: ForwardContext, num_blocks: int) -> None:
    for view in ctx.layer_views:
        paged.check_lengths(view.block_table, view.query_start, view.num_cached)
        paged.check_values(
            view.block_table, view.query_start, view.num_cached, ctx.num_seqs, BLOCK, num_blocks
        )


def _checks_per_step(ctx: ForwardContext, num_blocks: int) -> None:
    kernel = paged.StepKernel()
    for view in ctx.layer_views:
        assert view.store is not None
        kernel.check_indices(
            ctx.num_seqs, view.store, view.block_table, view.query_start, view.num_cached
        )


def prepare_us(context: int, batch_size: int, paged_views: bool, steps: int) -> list[float]:
    """Median microseconds of `prepare` for decode steps at `context` tokens, then (paged
    views) of the kernel input checks per layer and per step."""
    num_blocks = batch_size * (-(-(context + steps + 1) // BLOCK)) + 1
    runner = _runner(num_blocks, paged_views)
    cache = runner.cache
    assert cache is not None
    requests = []
    for i in range(batch_size):
        params = SamplingParams(max_tokens=steps + 1, temperature=0)
        request = Request(f"r{i}", None, [1] * (context + 1), params, detokenizer=None)  # type: ignore[arg-type]
        request.num_computed_tokens = context
        cache.allocate(request.request_id, context + 1)
        requests.append(request)
    checks = (_checks_per_layer, _checks_per_step) if paged_views else ()
    times: list[list[float]] = [[] for _ in range(1 + len(checks))]
    for _ in range(steps):
        batch = ScheduledBatch()
        for request in requests:
            batch.add(request, 1)
        start = time.perf_counter()
        ctx = runner.prepare(batch).ctx
        times[0].append(time.perf_counter() - start)
        for check, timed in zip(checks, times[1:], strict=True):  # alternating, step by step
            start = time.perf_counter()
            check(ctx, num_blocks)
            timed.append(time.perf_counter() - start)
        for request in requests:  # the token sampled: the next step decodes after it
            request.num_computed_tokens += 1
            request.token_ids.append(1)
            cache.allocate(request.request_id, len(request.token_ids))
    return [statistics.median(t[steps // 10 :]) * 1e6 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per case")
    args = parser.parse_args()
    print(f"host work per decode step, median of {args.steps} steps (us)")
    print(
        f"{'context':>8} {'batch':>6} {'paged':>10} {'reference':>10} "
        f"{'checks/layer':>13} {'checks/step':>12}"
    )
    for context in (512, 8192):
        for batch_size in (1, 16):
            paged_us, per_layer, per_step = prepare_us(context, batch_size, True, args.steps)
            (reference,) = prepare_us(context, batch_size, False, args.steps)
            print(
                f"{context:>8} {batch_size:>6} {paged_us:>10.0f} {reference:>10.0f} "
                f"{per_layer:>13.0f} {per_step:>12.0f}"
            )


if __name__ == "__main__":
    main()
