"""KV presses in the engine (issue 21): a pressed request's blocks fall to the kept tokens'
and go back to the pool, its decode reads only the kept K/V (held to a reference forward
that masks the dropped ones, exact path), pressed and plain requests share a batch, and
`score_continuations` equals scoring the concatenation without a press."""

from __future__ import annotations

import math

import pytest
import torch

from kvlm import LLM, KVPress, SamplingParams
from kvlm.engine.scoring import token_logprobs

BLOCK_SIZE = 16
DOC = (
    "The cache keeps the keys and values of every token a request has seen, in blocks of "
    "sixteen tokens. A press scores each cached token per layer and per head, keeps the "
    "tokens attention needs and gives the other blocks back to the pool, so that other "
    "requests can use them while this one keeps generating from what it kept. "
)


@pytest.fixture(scope="module")
def llm() -> LLM:
    # Float weights: the exact path; chunks of 64 tokens, so prompts take several steps.
    return LLM(
        "smollm2",
        weight_format="float",
        block_size=BLOCK_SIZE,
        max_model_len=1024,
        kv_cache_memory="64MiB",
        max_num_batched_tokens=64,
    )


def ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode(text)


def test_without_a_press_scoring_continuations_is_scoring_the_concatenation(llm: LLM) -> None:
    prompt, continuation = ids(llm, DOC * 2), ids(llm, " The press runs once per request.")
    whole = token_logprobs(llm.engine, prompt + continuation)[len(prompt) - 1 :]
    for press in (None, KVPress("knorm", ratio=0.0)):  # ratio 0 keeps every token
        [score] = llm.score_continuations(
            {"prompt_token_ids": prompt}, continuation, SamplingParams(kv_press=press)
        )
        assert score.token_ids == continuation
        assert torch.allclose(torch.tensor(score.logprobs), whole, atol=1e-4)
        assert math.isclose(score.total, float(whole.sum()), abs_tol=1e-3)
    llm.engine.kv_cache.check_integrity()
