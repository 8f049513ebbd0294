"""Prefill speed of the fused decoder plan against the layer-by-layer torch path, in one process.

Since the fused plan serves every cached step (prompt chunks included), a prompt's chunks run
the whole decoder stack as one C++ call instead of layer by layer. Two engines on the same
quantized weights, one with `fused_decode=True` (the default) and one with `fused_decode=False`,
prefill the same `--prompt-tokens` tokens of `kvlm.bench.haystack.reference_text()` in turns
(prefix caching off, so each run computes the whole prompt in chunks of the scheduler's
`max_num_batched_tokens`); the figure is prompt tokens over the time to the first token, the
median of `--rounds` runs each.

    python benchmarks/prefill_paths.py --model smollm2 --prompt-tokens 4096 [--kv-cache-dtype F]
"""

from __future__ import annotations

import argparse
import os
import statistics

from kvlm import LLM, SamplingParams
from kvlm.bench.haystack import reference_text
from kvlm.bench.machine import kernel_note, machine_info, machine_line


def prefill_tok_s(llm: LLM, prompt: list[int]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    (output,) = llm.generate([{"prompt_token_ids": prompt}], params)
    ttft = output.metrics.ttft_s
    assert ttft is not None and output.metrics.num_cached_tokens == 0
    return len(prompt) / ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engines = {
        path: LLM(
            args.model,
            weight_format="gguf",
            fused_decode=path == "fused",
            num_threads=args.threads,
            kv_cache_dtype=args.kv_cache_dtype,
            enable_prefix_caching=False,
            max_model_len=args.prompt_tokens + 16,
        )
        for path in ("fused", "layered")
    }
    if engines["fused"].engine.runner.fused is None:
        raise SystemExit("the fused plan does not run on this machine (see the log line above)")
    prompt = engines["fused"].tokenizer.encode(reference_text())[: args.prompt_tokens]
    if len(prompt) < args.prompt_tokens:
        raise SystemExit(f"reference_text() has only {len(prompt)} tokens; ask for fewer")
    speeds: dict[str, list[float]] = {path: [] for path in engines}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for path, llm in engines.items():
            speeds[path].append(prefill_tok_s(llm, prompt))
    load.append(os.getloadavg()[0])
    fused, layered = (statistics.median(speeds[p]) for p in ("fused", "layered"))
    store = engines["fused"].engine.kv_stores[0].format.name
    print(f"{args.model}, prefill of {args.prompt_tokens} tokens, {args.threads} threads, "
          f"{store} KV cache, median of {args.rounds} rounds; "
          f"load average {load[0]:.1f} -> {load[1]:.1f}")  # fmt: skip
    print(machine_line(machine_info()))
    print(kernel_note(engines["fused"].config.weight_format))
    print("\n| path | prefill tok/s | vs layered |\n|---|---:|---:|")
    print(f"| fused plan | {fused:.1f} | {fused / layered:.2f}x |")
    print(f"| layer by layer | {layered:.1f} | |")


if __name__ == "__main__":
    main()
