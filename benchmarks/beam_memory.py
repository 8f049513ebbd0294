"""Peak KV bytes of a beam search of width w (forked beams sharing blocks) against w
independent sequences of the same prompt and length (each under its own cache salt, so they
share nothing), on a ~1,000-token prompt; then of one sampled request with `n` = w (one
prefill, forked sequences) against n = 1. Bytes are read through the cache's door after every
forward pass (all layer groups, scales included); no timing.

    python benchmarks/beam_memory.py [--model smollm2] [--widths 2 4 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
from collections.abc import Callable

from kvlm import LLM, SamplingParams
from kvlm.engine.engine import LLMEngine
from kvlm.engine.observers import EngineObserver, ForwardEvent
from kvlm.sampling.beam import BeamSearchParams


class PeakBytes(EngineObserver):
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.peak = 0

    def on_forward(self, event: ForwardEvent) -> None:
        self.peak = max(self.peak, self.engine.kv_cache_bytes_used())


def peak_bytes(engine: LLMEngine, run: Callable[[], object]) -> int:
    observer = PeakBytes(engine)
    engine.add_observer(observer)
    try:
        run()
    finally:
        engine.remove_observer(observer)
    return observer.peak


def sampled(llm: LLM, ids: list[int], n: int, new_tokens: int) -> tuple[int, int]:
    """Peak KV bytes of one request sampling `n` sequences from `ids` (under its own cache
    salt: no hit from earlier runs), and how many of its prompt tokens were computed."""
    params = SamplingParams(n=n, max_tokens=new_tokens, ignore_eos=True, temperature=0.8, seed=1)
    outputs = []

    def run() -> None:
        outputs.extend(llm.generate([{"prompt_token_ids": ids}], params, cache_salt=f"n-{n}"))

    peak = peak_bytes(llm.engine, run)
    metrics = outputs[0].metrics
    return peak, metrics.num_prompt_tokens - metrics.num_cached_tokens


def prompt_ids(llm: LLM, num_tokens: int) -> list[int]:
    """English prose from CPython's docs, cut to `num_tokens` tokens."""
    text = ""
    for key in sorted(pydoc_data.topics.topics):
        text += pydoc_data.topics.topics[key]
        ids = llm.tokenizer.encode(text)
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise SystemExit("pydoc topics ran out of text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    llm = LLM(args.model, weight_format="float")
    engine = llm.engine
    ids = prompt_ids(llm, args.prompt_tokens)
    print(f"{args.model}, {len(ids)}-token prompt, {args.new_tokens} new tokens per sequence")
    print(f"{'width':>5}  {'beam search':>14}  {'independent':>14}  ratio")
    for width in args.widths:
        params = BeamSearchParams(beam_width=width, max_tokens=args.new_tokens, ignore_eos=True)
        beams = peak_bytes(engine, lambda p=params: llm.beam_search({"prompt_token_ids": ids}, p))
        one = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0)

        def independent(width: int = width, one: SamplingParams = one) -> None:
            for i in range(width):
                engine.add_request(None, ids, one, cache_salt=f"beam-memory-{width}-{i}")
            while engine.has_unfinished():
                engine.step()

        alone = peak_bytes(engine, independent)
        engine.kv_cache.check_integrity()
        mib = f"{beams / 2**20:>11.2f} MiB  {alone / 2**20:>11.2f} MiB"
        print(f"{width:>5}  {mib}  {beams / alone:.2f}")

    print(f"\n{'n':>5}  {'n sampled':>14}  {'n = 1':>14}  ratio  prompt tokens computed")
    for n in args.widths:
        (many, computed), (one, _) = (sampled(llm, ids, c, args.new_tokens) for c in (n, 1))
        mib = f"{many / 2**20:>11.2f} MiB  {one / 2**20:>11.2f} MiB"
        print(f"{n:>5}  {mib}  {many / one:.2f}  {computed}")


if __name__ == "__main__":
    main()
