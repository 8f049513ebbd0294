"""Decode speed of each KV cache technique relative to the plain cache, in one process.

Issue 18's CPU targets compare kvlm with itself: int8 KV >= 1.0x the float16 cache's decode
speed, int4 >= 0.9x, window + sinks >= 0.9x the plain cache. On a shared machine only figures
taken side by side mean anything, so this loads one engine per cache, then times them in turns
(round r times every cache once): each decodes `--new-tokens` greedy tokens at batch 1 after
a `--prompt-tokens` prompt (the request's decode_tok_s: prefill not counted), and the median
of the rounds is reported with its ratio to the reference cache. The acceptance figures are
`kvlm bench decode` runs on an idle machine (see the issue); this is the quick relative check.

    python benchmarks/paged_decode.py --model smollm2 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from kvlm import LLM, SamplingParams

CACHES = {  # name -> LLM keyword arguments; ratios are to the cache named in `reference`
    "float32": {"kv_cache_dtype": "float32"},
    "float16": {"kv_cache_dtype": "float16"},
    "int8": {"kv_cache_dtype": "int8"},
    "int4": {"kv_cache_dtype": "int4"},
    "fp8": {"kv_cache_dtype": "fp8"},
    "float32 window 1024 + 4 sinks": {
        "kv_cache_dtype": "float32",
        "sliding_window": 1024,
        "attention_sinks": 4,
    },  # fmt: skip
}
REFERENCE = {"float16": "float16", "int8": "float16", "int4": "float16", "fp8": "float16"}


def decode_tok_s(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens per second after the prompt's prefill (the request's own metric: tokens
    after the first one over the time since the first one)."""
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
    (output,) = llm.generate([{"prompt_token_ids": prompt}], params)
    return output.metrics.decode_tok_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llms = {
        name: LLM(args.model, weight_format="gguf", enable_prefix_caching=False, **kwargs)
        for name, kwargs in CACHES.items()
    }
    vocab = llms["float32"].tokenizer.vocab_size
    prompt = torch.randint(100, min(vocab, 20000), (args.prompt_tokens,)).tolist()
    speeds: dict[str, list[float]] = {name: [] for name in llms}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, llm in llms.items():
            speeds[name].append(decode_tok_s(llm, prompt, args.new_tokens))
    load.append(os.getloadavg()[0])
    speed = {name: statistics.median(s) for name, s in speeds.items()}
    print(f"{args.model}, batch 1, {args.new_tokens} tokens after {args.prompt_tokens}, "
          f"{args.threads} threads, median of {args.rounds} rounds; load average "
          f"{load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    print("| cache | decode tok/s | ratio |\n|---|---:|---|")
    for name, tok_s in speed.items():
        ref = REFERENCE.get(name, "float32")
        ratio = "" if ref == name else f"{tok_s / speed[ref]:.2f}x {ref}"
        print(f"| {name} | {tok_s:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
