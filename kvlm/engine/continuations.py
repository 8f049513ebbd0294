"""Log-probabilities of continuations given prompts whose KV cache a press compressed.

Each (prompt, continuation) pair is one request of the prompt's and the continuation's tokens
with `continuation_start` at the prompt's end: the prompt is prefilled (its chunks stop there),
the request's press (if any) compacts the prompt's cache, then the continuation is computed as
one chunk (or several, past the token budget) reading the compressed cache, with a logits row
per token. The continuation's first token is scored by the prompt's last row, computed before
the press as a pressed request's first generated token is; the others by rows after it.
Without a press this is exactly scoring the concatenation (engine/scoring.py). The pairs run
as one batch; each request samples one token at the end, which is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlm.engine.engine import InputError, LLMEngine
from kvlm.sampling import SamplingParams


@dataclass(frozen=True)
class ContinuationScore:
    token_ids: list[int]  # the continuation's tokens
    logprobs: list[float]  # per token, log p(token | prompt, the continuation before it)
    total: float  # their sum: the continuation's log-likelihood
    kv_pressed_bytes: int | None  # KV bytes the request held right after its press


def score_continuations(
    engine: LLMEngine,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
) -> list[ContinuationScore]:
    """Per pair, its continuation's token log-probabilities; only each `params.kv_press` is
    read (scoring is greedy and generates nothing). Runs alone on an idle engine."""
    if engine.has_unfinished():
        raise InputError("scoring needs an idle engine: finish or abort running requests first")
    if not len(prompts) == len(continuations) == len(params):
        raise InputError(
            f"got {len(prompts)} prompts, {len(continuations)} continuations and "
            f"{len(params)} SamplingParams: give one continuation and one params per prompt"
        )
    ids = []
    try:
        for prompt, continuation, sampling in zip(prompts, continuations, params, strict=True):
            if not prompt:
                raise InputError("a prompt is empty: the continuation needs one token before it")
            if not continuation:
                raise InputError("a continuation is empty: give at least one token")
            scoring = SamplingParams(
                max_tokens=1, temperature=0, prompt_logprobs=0, kv_press=sampling.kv_press
            )
            token_ids = [*prompt, *continuation]
            ids.append(engine.add_request(None, token_ids, scoring, continuation_start=len(prompt)))
        outputs = dict(zip(ids, engine.run_to_completion(ids), strict=True))
    finally:
        for request_id in ids:
            engine.abort(request_id)  # a no-op once it finished
    scores = []
    for request_id, continuation in zip(ids, continuations, strict=True):
        output = outputs[request_id]
        assert output.prompt_logprobs is not None
        entries = output.prompt_logprobs
        assert len(entries) == len(continuation), (len(entries), len(continuation))
        values = [entry[t].logprob for entry, t in zip(entries, continuation, strict=True)]
        scores.append(
            ContinuationScore(
                list(continuation), values, sum(values), output.metrics.kv_pressed_bytes
            )
        )
    return scores
