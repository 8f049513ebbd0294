"""Scoring a text computes every token's log-probability, however much of it is cached."""

from __future__ import annotations

import pytest
import torch
from scoring_texts import TEXTS

from kvlm import LLM
from kvlm.engine.engine import InputError
from kvlm.engine.scoring import token_logprobs
from kvlm.sampling import SamplingParams


def _llm() -> LLM:
    # Float weights: a step's numbers do not depend on what else is cached; chunks of 32
    # tokens, so each text is prefilled in several steps that read earlier ones' K/V back.
    return LLM("smollm2", weight_format="float", block_size=16, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def alone() -> list[torch.Tensor]:
    """Each text scored on a fresh engine."""
    out = []
    for text in TEXTS:
        llm = _llm()
        out.append(token_logprobs(llm.engine, llm.tokenizer.encode(text)))
    return out


def test_texts_sharing_a_cached_prefix_score_every_token(alone: list[torch.Tensor]) -> None:
    llm = _llm()
    engine = llm.engine
    ids = [llm.tokenizer.encode(text) for text in TEXTS]
    shared = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
    assert shared >= 2 * 16  # two full blocks of the header are cached after the first text
    # A generation request caches the first text's blocks; both texts then find them there.
    llm.generate({"prompt_token_ids": ids[0]}, SamplingParams(max_tokens=1, temperature=0))
    for token_ids, expected in zip(ids, alone, strict=True):
        scored = token_logprobs(engine, token_ids)
        assert scored.shape == (len(token_ids) - 1,)
        assert torch.equal(scored, expected)
        engine.kv_cache.check_integrity()
    assert not engine.has_unfinished()
    # Scoring took no hit but named its blocks: a later request reuses them.
    out = llm.generate({"prompt_token_ids": ids[1]}, SamplingParams(max_tokens=1))[0]
    assert out.metrics.num_cached_tokens == (len(ids[1]) - 1) // 16 * 16


def test_prompt_logprobs_through_generate() -> None:
    llm = _llm()
    token_ids = llm.tokenizer.encode(TEXTS[0])
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    llm.generate({"prompt_token_ids": token_ids}, SamplingParams(max_tokens=1))  # cached now
    [out] = llm.generate({"prompt_token_ids": token_ids}, params)
    entries = out.prompt_logprobs
    assert out.metrics.num_cached_tokens == 0  # every row it scores is computed
    assert entries is not None and len(entries) == len(token_ids) and entries[0] is None
    for entry, token in zip(entries[1:], token_ids[1:], strict=True):
        assert token in entry and 2 <= len(entry) <= 3  # the top 2, and the token if not there
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks[:2] == [1, 2] and entry[token].logprob <= 0
        assert all(lp.decoded_token is not None for lp in entry.values())
    assert torch.equal(
        torch.tensor([e[t].logprob for e, t in zip(entries[1:], token_ids[1:], strict=True)]),
        token_logprobs(llm.engine, token_ids).double(),
    )
    assert len(out.outputs[0].token_ids) == 3


def test_refusals() -> None:
    llm = _llm()
    with pytest.raises(InputError, match="at least 2 tokens"):
        token_logprobs(llm.engine, [1])
    llm.engine.add_request("busy", None, SamplingParams(max_tokens=1))
    with pytest.raises(InputError, match="idle engine"):
        token_logprobs(llm.engine, [1, 2, 3])
