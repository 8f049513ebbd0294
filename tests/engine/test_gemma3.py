"""Gemma 3's hybrid local/global layers: cache, no-cache and prefix hits agree past the window."""

from __future__ import annotations

import pydoc_data.topics

from kvlm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _prompt_ids(llm: LLM, num_tokens: int) -> list[int]:
    text = pydoc_data.topics.topics["class"] + pydoc_data.topics.topics["function"]
    ids = llm.tokenizer.encode(text)[:num_tokens]
    assert len(ids) == num_tokens
    return ids


def test_prefix_hit_on_hybrid_layers_gives_same_tokens(gemma3_llm: LLM) -> None:
    prompt = {"prompt_token_ids": _prompt_ids(gemma3_llm, 600)}
    first = gemma3_llm.generate([prompt], GREEDY)[0]
    second = gemma3_llm.generate([prompt], GREEDY)[0]
    assert first.metrics.num_cached_tokens == 0
    assert second.metrics.num_cached_tokens == 592  # 37 full blocks of 16; the rest computed
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    gemma3_llm.engine.kv_cache.check_integrity()


def test_no_cache_matches_cache_past_the_sliding_window(gemma3_llm: LLM) -> None:
    prompt = {"prompt_token_ids": _prompt_ids(gemma3_llm, 530)}
    nocache = LLM("gemma3-270m", use_cache=False, weight_format="float")  # as gemma3_llm
    expected = gemma3_llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert nocache.generate([prompt], GREEDY)[0].outputs[0].token_ids == expected
