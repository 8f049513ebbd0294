"""Log-probabilities of a text's own tokens, computed through the cache.

The text is prefilled in chunks of the engine's token budget, so every chunk after the first
attends to K/V read back from the cache: quantized, windowed or with sinks, exactly as
generation would see them. This is what `kvlm eval ppl` measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvlm.engine.engine import InputError, LLMEngine
from kvlm.engine.request import Request
from kvlm.sampling import SamplingParams
from kvlm.tokenizer import IncrementalDetokenizer


def token_logprobs(
    engine: LLMEngine,
    token_ids: Sequence[int],
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[n - 1] float32: log p(token i | tokens before it) for i = 1 .. n - 1.

    Runs alone on an idle engine; `on_progress(n)` hears of each chunk's token count.
    """
    if engine.has_unfinished():
        raise InputError("scoring needs an idle engine: finish or abort running requests first")
    if len(token_ids) < 2:
        raise InputError(f"scoring needs at least 2 tokens, got {len(token_ids)}")
    if not engine.unbounded_length and len(token_ids) > engine.max_model_len:
        raise InputError(
            f"text has {len(token_ids):,} tokens; the context is {engine.max_model_len:,}: "
            "shorten it (--max-tokens) or use --sliding-window with --attention-sinks"
        )
    request = Request(
        request_id="score",
        prompt=None,
        token_ids=list(token_ids),
        params=SamplingParams(max_tokens=1, temperature=0),
        detokenizer=IncrementalDetokenizer(engine.tokenizer, True),
    )
    targets = torch.tensor(token_ids[1:], dtype=torch.int64, device=engine.device)
    pieces = []
    engine.scheduler.add(request)
    try:
        while request.num_computed_tokens < len(token_ids):
            batch = engine.scheduler.schedule()
            if not batch.requests:
                raise RuntimeError("the KV pool cannot hold the next chunk of the text")
            start = request.num_computed_tokens
            hidden = engine.runner.run_all(batch)  # [chunk, H]
            engine.scheduler.update_after_step(batch)
            end = min(request.num_computed_tokens, len(token_ids) - 1)
            logits = engine.model.logits(hidden[: end - start])  # [chunk, vocab]
            logprobs = logits.log_softmax(dim=-1)
            pieces.append(logprobs.gather(1, targets[start:end, None]).squeeze(1))
            if on_progress is not None:
                on_progress(request.num_computed_tokens - start)
    finally:
        engine.scheduler.finish(request)
    return torch.cat(pieces)
