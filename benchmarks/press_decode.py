"""Decode speed after a KV press relative to the plain cache, in one process (issue 21).

Issue 21's speed line: decode after compressing a 4,096-token prompt at r = 0.75 is >= 2x the
plain cache's decode at 4,096 tokens. One engine (quantized weights, the fused decode plan)
runs every case as a request of its own, in turns (round r times every case once): each
decodes `--new-tokens` greedy tokens at batch 1 after the first `--prompt-tokens` tokens of
`kvlm.bench.haystack.reference_text()`, with no press or with `--methods` at `--ratios`.
The figure is the request's decode_tok_s (tokens after the first over the time since the
first): the prefill and the press, which runs before the first token is appended, are not
in it. The prompt's blocks stay in the prefix cache, so only the first case prefills it
whole; decode reads a pressed request's own compacted blocks either way. The median of the
rounds is reported with its ratio to the plain cache, beside the machine it ran on.

    python benchmarks/press_decode.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics

from kvlm import LLM, KVPress, SamplingParams
from kvlm.bench.haystack import reference_text
from kvlm.bench.machine import kernel_note, machine_info, machine_line


def decode(
    llm: LLM, prompt: list[int], new_tokens: int, press: KVPress | None
) -> tuple[float, int]:
    """(decode tok/s, KV bytes the request's tables held after its prompt)."""
    params = SamplingParams(
        max_tokens=new_tokens + 1, temperature=0, ignore_eos=True, kv_press=press
    )
    (output,) = llm.generate([{"prompt_token_ids": prompt}], params)
    metrics = output.metrics
    held = metrics.kv_pressed_bytes
    if held is None:  # the plain cache: each group's blocks for the prompt
        held = sum(s.max_blocks_held(len(prompt)) * s.page_nbytes for s in llm.engine.kv_specs)
    return metrics.decode_tok_s, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["snapkv", "knorm"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.5])
    args = parser.parse_args()
    llm = LLM(
        args.model,
        weight_format="gguf",
        num_threads=args.threads,
        max_model_len=args.prompt_tokens + args.new_tokens + 16,
    )
    prompt = llm.tokenizer.encode(reference_text())[: args.prompt_tokens]
    if len(prompt) < args.prompt_tokens:
        raise SystemExit(f"reference_text() has only {len(prompt)} tokens; ask for fewer")
    cases: dict[str, KVPress | None] = {"plain": None}
    for method in args.methods:
        for ratio in args.ratios:
            cases[f"{method} r={ratio}"] = KVPress(method, ratio=ratio)
    speeds: dict[str, list[float]] = {name: [] for name in cases}
    held: dict[str, int] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, press in cases.items():
            tok_s, held[name] = decode(llm, prompt, args.new_tokens, press)
            speeds[name].append(tok_s)
    load.append(os.getloadavg()[0])
    speed = {name: statistics.median(s) for name, s in speeds.items()}
    fused = "on" if llm.engine.runner.fused is not None else "off"
    print(f"{args.model}, batch 1, {args.new_tokens} tokens after {args.prompt_tokens}, "
          f"{args.threads} threads, fused decode {fused}, "
          f"{llm.engine.kv_stores[0].format.name} KV cache, median of {args.rounds} rounds; "
          f"load average {load[0]:.1f} -> {load[1]:.1f}")  # fmt: skip
    print(machine_line(machine_info()))
    print(kernel_note(llm.config.weight_format))
    print("\n| cache | KV after the prompt (MiB) | decode tok/s | vs plain |\n|---|---:|---:|---:|")
    for name, tok_s in speed.items():
        ratio = "" if name == "plain" else f"{tok_s / speed['plain']:.2f}x"
        print(f"| {name} | {held[name] / 2**20:.1f} | {tok_s:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
