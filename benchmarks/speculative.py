"""Decode speed with and without n-gram speculative decoding, at batch 1, in one process.

Issue 19's target: >= 1.5x decode tok/s on an input-grounded task (the prompt holds a long
passage from CPython's `pydoc_data.topics` and asks for it verbatim; the answer is primed with
its first words, so the model copies) and no slower on a task with nothing to look up (free
writing: speculation backs off). Two engines (with / without `speculative=`) are loaded once
and timed in turns, round r timing every (task, engine) pair once; the median decode tok/s of
the rounds (the request's decode_tok_s: prefill not counted), the speed-up, the acceptance rate
and the mean tokens per step are printed. On float weights (the exact path) the greedy outputs
are checked to be identical; on quantized weights a verification chunk runs the int8-activation
matmul at another row count than a decode step, so a near-tie may flip: the table then reports
how many leading tokens agree (the lowest over the rounds) instead of stopping.

    python benchmarks/speculative.py --model smollm2 --threads 2 --rounds 3 --num-tokens 4
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import statistics
from dataclasses import replace

import torch

from kvlm import LLM, SamplingParams


def tasks(passage_chars: int) -> dict[str, str]:
    passage = pydoc_data.topics.topics["class"][:passage_chars]
    return {
        "grounded (copy a passage)": (
            f"Copy the following text exactly, word for word.\n\n{passage}\n\n"
            f"The exact copy:\n\n{passage[:80]}"
        ),
        "nothing to look up": "Write a short story about a lighthouse keeper who finds a map.",
    }


def run(llm: LLM, prompt: str, new_tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
    (output,) = llm.generate([prompt], params)
    return output.metrics.decode_tok_s, output.outputs[0].token_ids


def _common_prefix(outputs: dict[str, list[int]]) -> int:
    """How many leading tokens the plain and the ngram engine's outputs share."""
    plain, ngram = outputs["plain"], outputs["ngram"]
    same = 0
    while same < min(len(plain), len(ngram)) and plain[same] == ngram[same]:
        same += 1
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--weight-format", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--passage-chars", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-tokens", type=int, default=4, help="drafts per step (k)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = {"weight_format": args.weight_format, "enable_prefix_caching": False}
    spec = {"method": "ngram", "num_tokens": args.num_tokens}
    engines = {
        "plain": LLM(args.model, **common),
        "ngram": LLM(args.model, **common, speculative=spec),
    }
    prompts = tasks(args.passage_chars)
    speeds: dict[tuple[str, str], list[float]] = {}
    stats = {}
    agreed: dict[str, int] = {}  # task -> fewest leading tokens plain and ngram share
    for _ in range(args.rounds):
        for task, prompt in prompts.items():
            outputs = {}
            for name, llm in engines.items():
                before = llm.engine.speculative_stats
                before = None if before is None else replace(before)
                tok_s, outputs[name] = run(llm, prompt, args.new_tokens)
                speeds.setdefault((task, name), []).append(tok_s)
                after = llm.engine.speculative_stats
                if after is not None and before is not None:
                    stats[task] = (
                        (after.num_accepted_tokens - before.num_accepted_tokens)
                        / max(after.num_draft_tokens - before.num_draft_tokens, 1),
                        (after.num_tokens - before.num_tokens)
                        / (after.num_steps - before.num_steps),
                    )
            if args.weight_format == "float":
                assert outputs["plain"] == outputs["ngram"], f"{task}: greedy outputs differ"
            agreed[task] = min(agreed.get(task, len(outputs["plain"])), _common_prefix(outputs))
    print(
        f"{args.model}, {args.weight_format} weights, {args.threads} threads, batch 1, "
        f"{args.new_tokens} new tokens, k={args.num_tokens}, median of {args.rounds} rounds"
    )
    print(
        f"{'task':28} {'plain tok/s':>12} {'ngram tok/s':>12} {'speed-up':>9} "
        f"{'accepted':>9} {'tok/step':>9} {'same tokens':>12}"
    )
    for task in prompts:
        plain = statistics.median(speeds[(task, "plain")])
        ngram = statistics.median(speeds[(task, "ngram")])
        accepted, per_step = stats[task]
        print(
            f"{task:28} {plain:12.1f} {ngram:12.1f} {ngram / plain:8.2f}x "
            f"{accepted:9.1%} {per_step:9.2f} {agreed[task]:>5}/{args.new_tokens + 1}"
        )


if __name__ == "__main__":
    main()
