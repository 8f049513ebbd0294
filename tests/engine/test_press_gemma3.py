"""KV presses on Gemma 3 (issue 21): its 3 global layers are pressed and its 15 local layers
keep their 512-token window, as kvpress does (engine/press.py). A pressed request's global
blocks fall to the kept tokens' while its local ones stay those of its window, its tokens read
only the kept K/V there (held to a no-cache forward whose mask says so), it shares a batch with
a plain request, and its decode steps run through the fused plan with per-group key counts."""

from __future__ import annotations

import math
import pydoc_data.topics

import pytest
import torch

from kvlm import LLM, KVPress, SamplingParams
from kvlm.kv.press_scores import token_scores
from tests.engine.press_reference import fused_against_layered, masked_reference, plain_kv
from tests.models.conftest import needs_simd

BLOCK_SIZE = 16
NUM_PROMPT = 608  # 38 full blocks: past the 512-token window, so the local layers let go too
ENGINE = {"block_size": BLOCK_SIZE, "max_model_len": 1024, "kv_cache_memory": "96MiB"}


@pytest.fixture(scope="module")
def llm() -> LLM:
    # Float weights: the exact path; chunks of 128 tokens, so the prompt takes several steps.
    return LLM("gemma3-270m", weight_format="float", max_num_batched_tokens=128, **ENGINE)


def prompt_ids(llm: LLM, num_tokens: int = NUM_PROMPT) -> list[int]:
    text = pydoc_data.topics.topics["class"] + pydoc_data.topics.topics["function"]
    ids = llm.tokenizer.encode(text)[:num_tokens]
    assert len(ids) == num_tokens
    return ids


def continuation_ids(llm: LLM) -> list[int]:
    return llm.tokenizer.encode(" So the press frees memory for the other requests.")


@pytest.mark.parametrize("method", ["knorm", "streaming_llm"])
def test_a_press_compacts_the_global_layers_and_leaves_the_local_window(
    llm: LLM, method: str
) -> None:
    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    full, local = engine.kv_specs
    assert full.window is None and local.window == 512 and len(full.layer_ids) == 3
    prompt, continuation = prompt_ids(llm), continuation_ids(llm)
    press = KVPress(method, ratio=0.5)
    [score] = llm.score_continuations(
        {"prompt_token_ids": prompt}, continuation, SamplingParams(kv_press=press)
    )
    keep = press.num_kept(NUM_PROMPT)  # 304: 19 blocks of the plain 38
    first_in_window = (NUM_PROMPT - local.window + 1) // BLOCK_SIZE  # 6: 32 blocks held
    window_blocks = NUM_PROMPT // BLOCK_SIZE - first_in_window
    assert score.kv_pressed_bytes == (
        math.ceil(keep / BLOCK_SIZE) * full.page_nbytes + window_blocks * local.page_nbytes
    )
    kept: list[torch.Tensor | None] = [None] * engine.model_config.num_layers
    for layer, (keys, values) in zip(full.layer_ids, plain_kv(llm, prompt), strict=True):
        scores = token_scores(press, keys, values, None)  # [H, n]
        kept[layer] = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    expected = masked_reference(llm, prompt, continuation, kept)
    assert torch.allclose(torch.tensor(score.logprobs), expected, atol=1e-4)
    whole = masked_reference(llm, prompt, continuation, None)
    assert (torch.tensor(score.logprobs) - whole)[1:].abs().max() > 1e-3  # the press mattered
    assert engine.kv_cache.num_used_blocks() == [0, 0]
    engine.kv_cache.check_integrity()


def test_pressed_and_plain_gemma3_requests_share_a_batch(llm: LLM) -> None:
    """Each result equals the request run alone. Right after its prefill the pressed request
    holds (1 - r) of its global blocks plus at most one, and its window in the local layers,
    as the plain request beside it does."""
    engine = llm.engine
    long_prompt = {"prompt_token_ids": prompt_ids(llm)}
    short_prompt = {"prompt_token_ids": llm.tokenizer.encode("Blocks of sixteen tokens hold")}
    ratio, press = 0.75, KVPress("snapkv", 0.75, window=16)
    pressed = SamplingParams(max_tokens=6, temperature=0, kv_press=press)
    plain = SamplingParams(max_tokens=6, temperature=0)
    alone = []
    for prompt, params in ((long_prompt, pressed), (short_prompt, plain)):
        engine.kv_cache.reset_prefix_cache()
        alone += llm.generate(prompt, params)
    engine.kv_cache.reset_prefix_cache()
    together = llm.generate([long_prompt, short_prompt], [pressed, plain])
    for a, b in zip(alone, together, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    full, local = engine.kv_specs
    window_bytes = (NUM_PROMPT // BLOCK_SIZE - 6) * local.page_nbytes  # as above: 32 blocks
    global_blocks = (together[0].metrics.kv_pressed_bytes - window_bytes) / full.page_nbytes
    assert global_blocks == math.ceil(press.num_kept(NUM_PROMPT) / BLOCK_SIZE)  # 10
    assert global_blocks <= (1 - ratio) * NUM_PROMPT / BLOCK_SIZE + 1
    assert together[0].metrics.kv_pressed_bytes == alone[0].metrics.kv_pressed_bytes
    assert together[1].metrics.kv_pressed_bytes is None
    assert engine.kv_cache.num_used_blocks() == [0, 0]
    engine.kv_cache.check_integrity()


@needs_simd
def test_pressed_gemma3_decode_takes_the_fused_plan(llm: LLM) -> None:
    """The plan gets each group's key counts (the global layers' compacted, the local ones' by
    text), so every decode step of the pressed request runs through it, and its tokens'
    log-probabilities are those the layer-by-layer path gives the same tokens after the same
    press, to the int8 rounding noise by which the two paths differ without a press (as
    test_press.py's SmolLM2 test measures). Handing the plan the global layers' counts for
    every group instead puts the local layers 304 keys off: measured 1.17 nats on one token."""
    prompt = prompt_ids(llm)
    difference = fused_against_layered("gemma3-270m", ENGINE, prompt, KVPress("knorm", 0.5), 8)
    assert difference.max() < 0.3 and difference.mean() < 0.1, difference
