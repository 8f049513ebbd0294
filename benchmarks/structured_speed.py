"""Constrained vs unconstrained decoding speed, in one run on one engine (relative figures).

    python benchmarks/structured_speed.py --model smollm2 --tokens 128 --threads 2

Batch 1 and 16 streams, each unconstrained, held to a JSON schema, and (16 streams) mixed half
and half; every request generates exactly `--tokens` tokens (EOS ignored; the schema's array
needs more items than fit), so each row is the same work but for the grammar. Reported per
configuration: decode tok/s per stream (tokens after the first, over the time from the
batch's first token to its last) and in total; for the mixed batch each half on its own.
Then issue 20's three ratios, from this one run: constrained / unconstrained at batch 1 and at
16 streams (bar: >= 0.9x), and what the unconstrained half of the mixed batch loses against
16 unconstrained streams (bar: < 3%).
"""

from __future__ import annotations

import argparse
import json

from kvlm import LLM, SamplingParams, StructuredOutputsParams, openmp
from kvlm.bench.machine import machine_info, machine_line

PROMPT = "<|im_start|>user\nList many first names as JSON.<|im_end|>\n<|im_start|>assistant\n"
# An array that cannot close within --tokens: every request runs to max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "names": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 500,
        }
    },
    "required": ["names"],
    "additionalProperties": False,
}


def _params(tokens: int, constrained: bool) -> SamplingParams:
    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    return SamplingParams(
        temperature=0, max_tokens=tokens, ignore_eos=True, structured_outputs=spec
    )


def run(llm: LLM, kinds: list[bool], tokens: int) -> dict[bool, float]:
    """Decode tok/s per stream of the constrained (True) and unconstrained (False) requests of
    one batch."""
    outs = llm.generate([PROMPT] * len(kinds), [_params(tokens, k) for k in kinds])
    rates: dict[bool, float] = {}
    for kind in set(kinds):
        mine = [o for o, k in zip(outs, kinds, strict=True) if k == kind]
        assert all(len(o.outputs[0].token_ids) == tokens for o in mine), "a request stopped early"
        first = min(o.metrics.first_token_time for o in mine)
        last = max(o.metrics.finish_time for o in mine)
        rates[kind] = (tokens - 1) / (last - first)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="best of N per configuration")
    args = parser.parse_args()
    llm = LLM(args.model, num_threads=args.threads, max_num_seqs=16)
    check = llm.generate([PROMPT], _params(40, True))[0].outputs[0].text
    assert check.startswith('{"names": ['), check  # warms up and checks the constraint holds
    configs = {
        "batch 1": [False],
        "batch 1, JSON schema": [True],
        "16 streams": [False] * 16,
        "16 streams, JSON schema": [True] * 16,
        "16 streams, 8 + 8 mixed": [True, False] * 8,
    }
    results: dict[str, dict[bool, float]] = {}
    for name, kinds in configs.items():
        best: dict[bool, float] = {}
        for _ in range(args.repeats):
            for kind, rate in run(llm, kinds, args.tokens).items():
                best[kind] = max(best.get(kind, 0.0), rate)
        results[name] = best
    print(
        machine_line(machine_info()),
        f"torch threads {args.threads or 'default'}, idle OpenMP threads sleep: "
        f"{openmp.IDLE_THREADS_SLEEP}",
    )
    print(f"{args.model}, {args.tokens} tokens per request, best of {args.repeats}\n")
    print("| configuration | decode tok/s per stream | total | vs unconstrained |")
    print("|---|---:|---:|---:|")
    base = {1: results["batch 1"][False], 16: results["16 streams"][False]}
    for name, rates in results.items():
        size = len(configs[name])
        for kind, rate in sorted(rates.items()):
            label = name if len(rates) == 1 else f"{name}: {'JSON' if kind else 'free'} half"
            total = rate * size / len(rates)
            print(f"| {label} | {rate:,.1f} | {total:,.1f} | {rate / base[size]:.3f}x |")
    one = results["batch 1, JSON schema"][True] / base[1]
    sixteen = results["16 streams, JSON schema"][True] / base[16]
    loss = 1 - results["16 streams, 8 + 8 mixed"][False] / base[16]
    acceptance = {
        "batch 1, constrained / unconstrained (>= 0.9)": f"{one:.3f}x",
        "16 streams, constrained / unconstrained (>= 0.9)": f"{sixteen:.3f}x",
        "mixed batch, what the unconstrained requests lose (< 3%)": f"{loss:.1%}",
    }
    print("\nIssue 20's bar:")
    for name, value in acceptance.items():
        print(f"- {name}: {value}")
    print("\n" + json.dumps({k: {str(kk): v for kk, v in r.items()} for k, r in results.items()}))


if __name__ == "__main__":
    main()
