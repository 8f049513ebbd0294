"""Time llguidance's next-token mask, per token of a JSON document, on kvlm's tokenizers.

    python benchmarks/grammar_masks.py

For each embedded model: building llguidance's tokenizer (once per engine), compiling a nested
schema, and computing the mask before each token of a document that satisfies it (mean, median
and max over the document, in microseconds): the work the mask worker does per step and row.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial

from kvlm.loading import resolve_model_path
from kvlm.sampling.structured import StructuredDecoder
from kvlm.sampling.structured_grammar import empty_mask, fill_mask
from kvlm.sampling.structured_params import StructuredOutputsParams
from kvlm.tokenizer import Tokenizer
from kvlm.tokenizer.llguidance_bridge import llguidance_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "number"}},
                "required": ["k", "v"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Bob", "age": 3, "tags": [{"k": "a", "v": 1.5}, {"k": "b", "v": 2}]}


def main() -> None:
    for model in ("smollm2", "gemma3-270m"):
        path = resolve_model_path(model)
        tokenizer = Tokenizer.from_gguf(path)
        vocab = tokenizer.vocab_size
        stop = sorted(tokenizer.stop_token_ids)
        decoder = StructuredDecoder(partial(llguidance_tokenizer, tokenizer, vocab, stop), vocab)
        start = time.perf_counter()
        decoder.compiler.tokenizer  # noqa: B018 (builds it)
        built = time.perf_counter() - start
        start = time.perf_counter()
        grammar = decoder.start(StructuredOutputsParams(json=SCHEMA))
        compiled = time.perf_counter() - start
        ids = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
        allowed = empty_mask(vocab)
        times = []
        for token_id in ids:
            start = time.perf_counter()
            fill_mask(grammar.matcher, allowed)
            times.append((time.perf_counter() - start) * 1e6)
            decoder.advance(grammar, token_id)
        print(
            f"{model}: {vocab:,} tokens; llguidance tokenizer {built:.2f} s, schema "
            f"{compiled * 1e3:.1f} ms; mask per token over {len(ids)} tokens: mean "
            f"{statistics.mean(times):.0f} us, median {statistics.median(times):.0f} us, "
            f"max {max(times):.0f} us"
        )
        decoder.close()


if __name__ == "__main__":
    main()
