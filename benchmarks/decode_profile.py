"""Where a decode step's time goes, on quantized weights: the fused C++ stack by phase
(kvlm.DecodePlan's own timers), the lm_head, and everything else in the step (scheduler, runner
indices, embedding, sampler, detokenizer), and the same step on the torch path for comparison.

    python benchmarks/decode_profile.py --model smollm2 --new-tokens 128,512 --threads 2
    python benchmarks/decode_profile.py --model smollm2 --new-tokens 128 --batch-size 16
    python benchmarks/decode_profile.py --model smollm2 --new-tokens 128 --prompt-tokens 512 \
        --sliding-window 1024 --attention-sinks 4
    python benchmarks/decode_profile.py --model smollm2 --new-tokens 128 --prompt-tokens 1900 \
        --block-size 4

Each length is one greedy generation of `--batch-size` sequences decoded together from a short
prompt (`--prompt-tokens N`: distinct prompts of N tokens; prefix caching off); the figures are
per decode step (one token of each sequence), averaged over the pure decode steps after every
sequence has its first token (a longer run also averages longer contexts).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from kvlm import LLM, SamplingParams
from kvlm.bench.decode import prompt_ids
from kvlm.bench.machine import machine_info, machine_line
from kvlm.engine.fused_decode import FusedDecoder
from kvlm.models.layers import Linear

PROMPT = "The history of the printing press"


def _timed(fn: Callable, total: list[float]) -> Callable:
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        total[0] += time.perf_counter() - start
        return out

    return wrapper


def profile(llm: LLM, new_tokens: int, prompts: list[list[int]]) -> dict[str, float]:
    """ms per decode step: the step and its parts. The requests are stepped until each has its
    first token (prefill and any mixed prefill + decode steps), then every later step (all
    pure decode, all rows in lockstep) is timed."""
    engine = llm.engine
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=4))
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
    for ids in prompts:
        engine.add_request(None, ids, params)
    while engine.waiting_requests() or not all(
        r.output_token_ids for r in engine.running_requests()
    ):
        engine.step()
    fused_s, head_s = [0.0], [0.0]
    head = engine.model.lm_head
    head.forward = _timed(Linear.forward.__get__(head), head_s)
    fused = engine.runner.fused
    if fused is not None:
        fused.plan.profile(True)
        before = dict(fused.plan.timings())
    call = FusedDecoder.__call__
    FusedDecoder.__call__ = _timed(call, fused_s)
    steps = 0
    try:
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        wall = time.perf_counter() - start
    finally:
        FusedDecoder.__call__ = call
        del head.forward
    per = 1e3 / steps
    row = {"step": wall * per, "lm_head": head_s[0] * per}
    if fused is not None:
        fused.plan.profile(False)
        after = dict(fused.plan.timings())
        phases = {k: (after[k] - before.get(k, 0.0)) * per for k in after if k != "calls"}
        row.update({f"fused: {k}": v for k, v in phases.items()})
        row["fused call (Python side)"] = fused_s[0] * per - sum(phases.values())
        row["rest of the step"] = row["step"] - fused_s[0] * per - row["lm_head"]
    else:
        row["decoder layers (torch)"] = row["step"] - row["lm_head"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--new-tokens", default="128,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-dtype", default="auto", help="as EngineConfig.kv_cache_dtype")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences decoded together")
    parser.add_argument(
        "--prompt-tokens", type=int, default=0, help="prompt length (0: a 7-token prompt)"
    )
    parser.add_argument("--sliding-window", type=int, default=None)
    parser.add_argument("--attention-sinks", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.new_tokens.split(",")]
    results = {}
    for fused in (True, False):
        llm = LLM(
            args.model,
            weight_format="gguf",
            fused_decode=fused,
            num_threads=args.threads,
            kv_cache_dtype=args.kv_cache_dtype,
            sliding_window=args.sliding_window,
            attention_sinks=args.attention_sinks,
            block_size=args.block_size,
            enable_prefix_caching=False,
        )
        prompts = [llm.get_tokenizer().encode(PROMPT)] * args.batch_size
        if args.prompt_tokens:
            prompts = prompt_ids(llm.get_tokenizer(), args.prompt_tokens, args.batch_size)
        name = "fused" if fused else "torch"
        results[name] = {n: profile(llm, n, prompts) for n in lengths}
        del llm
    print(
        f"{args.model}, gguf weights, KV cache {args.kv_cache_dtype}, window "
        f"{args.sliding_window} + {args.attention_sinks} sinks, {args.block_size}-token blocks, "
        f"batch {args.batch_size}, "
        f"prompt {args.prompt_tokens or 'short'}, ms per decode step. "
        f"{machine_line(machine_info())}\n"
    )
    for name, rows in results.items():
        print(f"| {name} path | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
        print("|---|" + "---:|" * len(lengths))
        for key in rows[lengths[0]]:
            print(f"| {key} | " + " | ".join(f"{rows[n][key]:.2f}" for n in lengths) + " |")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
