"""Log-probabilities of a text's own tokens, computed through the cache.

The text is one request with `prompt_logprobs=0`, run by the engine's own step: the scheduler
takes no prefix hit over the tokens it scores, so every token is scored however much of the
text is cached, and it is prefilled in chunks of the engine's token budget, so every chunk after
the first attends to K/V read back from the cache: quantized, windowed or with sinks, exactly
as generation would see them. This is what `kvlm eval ppl` measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvlm.engine.engine import InputError, LLMEngine
from kvlm.engine.observers import EngineObserver, StepEvent
from kvlm.sampling import SamplingParams


class _Progress(EngineObserver):
    """Hands `on_progress` the tokens each step computed of one request."""

    def __init__(self, request_id: str, on_progress: Callable[[int], None]) -> None:
        self.request_id = request_id
        self.on_progress = on_progress

    def on_step(self, event: StepEvent) -> None:
        for scheduled in event.scheduled:
            if scheduled.request.request_id == self.request_id:
                self.on_progress(scheduled.num_tokens)


def token_logprobs(
    engine: LLMEngine,
    token_ids: Sequence[int],
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[n - 1] float32: log p(token i | tokens before it) for i = 1 .. n - 1.

    Runs alone on an idle engine (other requests' outputs would be lost); `on_progress(n)`
    hears of each chunk's token count.
    """
    if engine.has_unfinished():
        raise InputError("scoring needs an idle engine: finish or abort running requests first")
    if len(token_ids) < 2:
        raise InputError(f"scoring needs at least 2 tokens, got {len(token_ids)}")
    if not engine.unbounded_length and len(token_ids) >= engine.max_model_len:
        raise InputError(
            f"text has {len(token_ids):,} tokens; the context is {engine.max_model_len:,} "
            "(scoring leaves room for one more): shorten it (--max-tokens) or use "
            "--sliding-window with --attention-sinks"
        )
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    request_id = engine.add_request(None, token_ids, params, request_id="score")
    progress = None if on_progress is None else _Progress(request_id, on_progress)
    if progress is not None:
        engine.add_observer(progress)
    entries = None
    try:
        while entries is None:
            if not engine.has_unfinished():
                raise RuntimeError("the engine finished the scoring request without its output")
            for output in engine.step():
                if output.request_id == request_id and output.prompt_logprobs is not None:
                    entries = output.prompt_logprobs
    finally:
        engine.abort(request_id)  # a no-op once it finished
        if progress is not None:
            engine.remove_observer(progress)
    values = [entry[token].logprob for entry, token in zip(entries[1:], token_ids[1:], strict=True)]
    return torch.tensor(values, dtype=torch.float32)
