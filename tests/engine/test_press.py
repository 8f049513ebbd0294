"""KV presses in the engine (issue 21): a pressed request's blocks fall to the kept tokens'
and go back to the pool, its decode reads only the kept K/V (held to a reference forward
that masks the dropped ones, exact path), pressed and plain requests share a batch, and
`score_continuations` equals scoring the concatenation without a press."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kvlm import LLM, KVPress, SamplingParams
from kvlm.engine.engine import InputError
from kvlm.engine.press import why_no_press
from kvlm.engine.scoring import token_logprobs
from kvlm.kv.press_scores import token_scores
from kvlm.kv.spec import KVCacheSpec
from kvlm.sampling.press import METHOD_OPTIONS
from tests.engine.press_reference import (
    QueryRecorder,
    fused_against_layered,
    masked_reference,
    plain_kv,
)
from tests.models.conftest import needs_simd

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


def kvpress_expected_attention(
    queries: torch.Tensor,  # [w, nh, hd] before rope
    keys: torch.Tensor,  # [n, H, hd] after rope
    values: torch.Tensor,  # [n, H, hd]
    inv_freq: torch.Tensor,  # [hd / 2]
    press: KVPress,
) -> torch.Tensor:  # [H, n]
    """ExpectedAttentionPress.score as kvpress writes it: statistics of the pre-rope queries,
    mean and covariance rotated by the mean rope matrix R over the positions after the press,
    logits mu.k / sqrt(d) + k^T Sigma k / (2 d) over the keys after the sinks, softmax, mean
    over the group, times ||v||, sinks at the top score."""
    n, num_heads, hd = keys.shape
    groups, half, sinks = queries.shape[1] // num_heads, hd // 2, press.num_sinks
    positions = torch.arange(n, n + press.num_future_positions).double()
    angles = positions[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    p = torch.zeros(hd, hd, dtype=torch.float64)
    p[half:, :half], p[:half, half:] = torch.eye(half), -torch.eye(half)
    rotation = (cos[:, :, None] * torch.eye(hd) + sin[:, :, None] * p).mean(dim=0).float()
    mu = queries.mean(dim=0)  # [nh, hd]
    sigma = torch.einsum("wha,whb->hab", queries - mu, queries - mu) / len(queries)
    mu, sigma = mu @ rotation.T, rotation @ sigma @ rotation.T
    body = keys[sinks:].repeat_interleave(groups, dim=1).transpose(0, 1)  # [nh, n - s, hd]
    logits = (body @ mu[:, :, None])[..., 0] / math.sqrt(hd)
    logits += ((body @ sigma) * body).sum(-1) / hd / 2
    weights = logits.softmax(dim=-1).view(num_heads, groups, n - sinks).mean(dim=1)
    scores = weights * values[sinks:].norm(dim=-1).T
    return torch.nn.functional.pad(scores, (sinks, 0), value=scores.max().item())


@pytest.mark.parametrize("window", [32, 200])  # 200: every query after the sinks, as kvpress
def test_expected_attention_keeps_the_tokens_kvpress_would(llm: LLM, window: int) -> None:
    prompt = ids(llm, DOC * 3)[:160]
    continuation = ids(llm, " So the press frees memory for the other requests.")
    press = KVPress("expected_attention", ratio=0.5, window=window)
    [score] = llm.score_continuations(
        {"prompt_token_ids": prompt}, continuation, SamplingParams(kv_press=press)
    )
    keep = press.num_kept(len(prompt))
    assert (
        score.kv_pressed_bytes == math.ceil(keep / BLOCK_SIZE) * llm.engine.kv_specs[0].page_nbytes
    )
    recorder = QueryRecorder()
    masked_reference(llm, prompt, continuation, None, recorder)
    hd = llm.engine.model_config.head_dim
    assert recorder.scales == {1 / math.sqrt(hd)}  # kvpress's scale
    first = max(len(prompt) - window, press.num_sinks)
    kept = []
    for layer, (keys, values) in enumerate(plain_kv(llm, prompt)):
        queries = recorder.queries[layer][first : len(prompt)]
        inv_freq = recorder.ropes[layer].inv_freq
        scores = kvpress_expected_attention(queries, keys, values, inv_freq, press)
        kept.append(scores.topk(keep, dim=-1).indices.sort(dim=-1).values)
    expected = masked_reference(llm, prompt, continuation, kept)
    assert torch.allclose(torch.tensor(score.logprobs), expected, atol=1e-4)
    assert llm.engine.kv_cache.num_used_blocks() == [0]
    llm.engine.kv_cache.check_integrity()


def test_tova_keeps_the_tokens_the_newest_query_attends_to(llm: LLM) -> None:
    """The prompt's last token's query, rotated at its own position (159) and scaled, over the
    160 stored keys: softmax, the mean over all query heads, the newest token on top; its 64
    best for every KV head. The continuation (under a block) reads only those."""
    prompt = ids(llm, DOC * 3)[:160]
    continuation = ids(llm, " So the press frees memory for the other requests.")
    assert len(continuation) < BLOCK_SIZE  # no second press before it ends
    press = KVPress("tova", budget=64)
    [score] = llm.score_continuations(
        {"prompt_token_ids": prompt}, continuation, SamplingParams(kv_press=press)
    )
    page = llm.engine.kv_specs[0].page_nbytes
    assert score.kv_pressed_bytes == 4 * page  # 64 of the 160 tokens
    recorder = QueryRecorder()
    masked_reference(llm, prompt, continuation, None, recorder)
    (scale,) = recorder.scales
    n, position = len(prompt), len(prompt) - 1
    kept = []
    for layer, (keys, _) in enumerate(plain_kv(llm, prompt)):
        q = recorder.queries[layer][position]  # [nh, hd] before rope
        angles = position * recorder.ropes[layer].inv_freq.double()
        cos, sin = torch.cat([angles.cos()] * 2).float(), torch.cat([angles.sin()] * 2).float()
        half = q.shape[-1] // 2
        q = (q * cos + torch.cat([-q[:, half:], q[:, :half]], -1) * sin) * scale
        groups = q.shape[0] // keys.shape[1]
        weights = torch.einsum("hd,khd->hk", q, keys.repeat_interleave(groups, dim=1))
        scores = weights.softmax(dim=-1).mean(dim=0)  # [n]
        scores[n - 1] = scores[: n - 1].max()
        best = scores.topk(press.num_kept(n)).indices.sort().values
        kept.append(best.expand(keys.shape[1], -1))  # [H, 64]
    expected = masked_reference(llm, prompt, continuation, kept)
    assert torch.allclose(torch.tensor(score.logprobs), expected, atol=1e-4)
    llm.engine.kv_cache.check_integrity()


@pytest.mark.parametrize("method", ["knorm", "streaming_llm"])
def test_decode_after_a_press_reads_only_the_kept_tokens(llm: LLM, method: str) -> None:
    prompt = ids(llm, DOC * 3)[:160]  # ten full blocks
    continuation = ids(llm, " So the press frees memory for the other requests.")
    press = KVPress(method, ratio=0.5, num_sinks=4)
    [score] = llm.score_continuations(
        {"prompt_token_ids": prompt}, continuation, SamplingParams(kv_press=press)
    )
    keep = press.num_kept(len(prompt))  # 80: five blocks
    page = llm.engine.kv_specs[0].page_nbytes
    assert score.kv_pressed_bytes == math.ceil(keep / BLOCK_SIZE) * page
    kept = [
        token_scores(press, keys, values, None).topk(keep, dim=-1).indices.sort(dim=-1).values
        for keys, values in plain_kv(llm, prompt)
    ]
    expected = masked_reference(llm, prompt, continuation, kept)
    assert torch.allclose(torch.tensor(score.logprobs), expected, atol=1e-4)
    whole = masked_reference(llm, prompt, continuation, None)
    assert (torch.tensor(score.logprobs) - whole)[1:].abs().max() > 1e-3  # the press mattered
    assert score.logprobs[0] == pytest.approx(float(whole[0]), abs=1e-4)  # scored before it
    llm.engine.kv_cache.check_integrity()


def test_pressed_and_plain_requests_share_a_batch(llm: LLM) -> None:
    """Each result equals the request run alone; the pressed one's blocks fall to the kept
    tokens' (at most (1 - r) of the plain ones plus one block) right after its prefill."""
    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    long_prompt = {"prompt_token_ids": ids(llm, DOC * 3)[:150]}
    short_prompt = {"prompt_token_ids": ids(llm, "Blocks of sixteen tokens hold the cache of")}
    ratio = 0.75
    pressed = SamplingParams(max_tokens=6, temperature=0, kv_press=KVPress("snapkv", ratio, 16))
    plain = SamplingParams(max_tokens=6, temperature=0)
    alone = [llm.generate(long_prompt, pressed)[0], llm.generate(short_prompt, plain)[0]]
    engine.kv_cache.reset_prefix_cache()
    together = llm.generate([long_prompt, short_prompt], [pressed, plain])
    for a, b in zip(alone, together, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    page = engine.kv_specs[0].page_nbytes
    plain_blocks = math.ceil(150 / BLOCK_SIZE)  # 10
    held = together[0].metrics.kv_pressed_bytes // page
    assert held == math.ceil(KVPress("snapkv", ratio, 16).num_kept(150) / BLOCK_SIZE)  # 3
    assert held <= (1 - ratio) * plain_blocks + 1
    assert together[0].metrics.kv_pressed_bytes == alone[0].metrics.kv_pressed_bytes
    assert together[1].metrics.kv_pressed_bytes is None
    assert engine.kv_cache.num_used_blocks() == [0]
    engine.kv_cache.check_integrity()


def test_snapkv_and_expected_attention_requests_share_a_batch(llm: LLM) -> None:
    """In chunks of 64 tokens the second step computes the first prompt's tokens 64-99 (its
    snapkv window: 84-99) and the second's 0-27 (its expected_attention window starts after
    the 4 sinks and ends in the next step): one capture holds both presses' rows, each rotated
    its own way. Each request ends as it does alone."""
    engine = llm.engine
    prompts = [
        {"prompt_token_ids": ids(llm, DOC * 2)[:100]},
        {"prompt_token_ids": ids(llm, DOC)[:30]},
    ]
    presses = [KVPress("snapkv", 0.75, window=16), KVPress("expected_attention", 0.5, window=32)]
    params = [SamplingParams(max_tokens=6, temperature=0, kv_press=p) for p in presses]
    alone = []
    for prompt, p in zip(prompts, params, strict=True):
        engine.kv_cache.reset_prefix_cache()
        alone += llm.generate(prompt, p)
    engine.kv_cache.reset_prefix_cache()
    together = llm.generate(prompts, params)
    for a, b in zip(alone, together, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.metrics.kv_pressed_bytes == b.metrics.kv_pressed_bytes is not None
    assert engine.kv_cache.num_used_blocks() == [0]
    engine.kv_cache.check_integrity()


def test_bad_presses_are_refused_at_add_request(llm: LLM) -> None:
    short = {"prompt_token_ids": ids(llm, "A short prompt.")}
    params = SamplingParams(kv_press=KVPress("snapkv", window=64))
    with pytest.raises(
        InputError, match=r"snapkv scores the \d+ tokens before the press by a window of 64"
    ):
        llm.generate(short, params)
    assert not llm.engine.has_unfinished()


def test_engines_a_press_cannot_run_on_say_why() -> None:
    full = KVCacheSpec((0, 1), 3, 64, BLOCK_SIZE, "float32")
    local = KVCacheSpec((2, 3), 3, 64, BLOCK_SIZE, "float32", window=512)
    sinks = KVCacheSpec((2, 3), 3, 64, BLOCK_SIZE, "float32", window=512, num_sinks=4)
    press = KVPress("knorm")

    def engine(**kw: object) -> SimpleNamespace:
        fields = {"kv_cache": object(), "kv_specs": (full,), "speculative": None, **kw}
        return SimpleNamespace(**fields)

    assert why_no_press(engine(), press, 100) is None  # type: ignore[arg-type]
    # Gemma 3's layout: the global layers are pressed, the local ones keep their window
    assert why_no_press(engine(kv_specs=(full, local)), press, 100) is None  # type: ignore[arg-type]
    cases = [
        (engine(kv_cache=None), "runs without one (use_cache=False)"),
        (engine(kv_specs=(local,)), "every layer keeps a window (512 tokens)"),
        (engine(kv_specs=(sinks,)), "drop --sliding-window / --attention-sinks"),
        (engine(speculative=object()), "speculative decoding"),
    ]
    for fake, words in cases:
        assert words in why_no_press(fake, press, 100)  # type: ignore[arg-type, operator]
    assert "window of 64" in why_no_press(engine(), KVPress("snapkv"), 64)  # type: ignore[arg-type, operator]
    assert why_no_press(engine(), KVPress("snapkv"), 65) is None  # type: ignore[arg-type]
    budget = why_no_press(engine(), KVPress("tova", budget=BLOCK_SIZE - 1), 100)  # type: ignore[arg-type]
    assert budget is not None and "give budget >= 16" in budget
    assert why_no_press(engine(), KVPress("tova", budget=BLOCK_SIZE), 100) is None  # type: ignore[arg-type]
    sinks = KVPress("expected_attention", num_sinks=4)
    assert "keeps the first 4 tokens" in why_no_press(engine(), sinks, 4)  # type: ignore[arg-type, operator]
    assert why_no_press(engine(), sinks, 5) is None  # type: ignore[arg-type]


@needs_simd
@pytest.mark.parametrize(("method", "ratio"), [("knorm", 0.5), ("snapkv", 0.75)])
def test_pressed_decode_takes_the_fused_plan(method: str, ratio: float, llm: LLM) -> None:
    """The fused decode plan ropes by text position and counts keys by cache position, so
    every decode step of a compacted request runs through it (one plan call, no torch layer),
    and its tokens' log-probabilities are those the layer-by-layer path gives the same tokens
    after the same press, on the same quantized weights, to the int8 rounding noise by which
    the two paths differ without a press too. Not the greedy tokens themselves: that noise
    (measured here: up to 0.16 nats a token, 0.05 on average; 0.12 without a press) flips
    near-ties, e.g. knorm's seventh token, three candidates within 0.06 nats. The same tokens
    scored without the press differ by up to 13 nats; tests/models/test_fused_decode_layers.py
    holds the plan to the torch layers on a pressed cache layer by layer."""
    engines = {"block_size": BLOCK_SIZE, "max_model_len": 512, "kv_cache_memory": "32MiB"}
    press = KVPress(method, ratio)
    difference = fused_against_layered("smollm2", engines, ids(llm, DOC * 2), press, 16)
    if METHOD_OPTIONS[method].queries == "window":  # its prefill captures them: layered
        assert difference[0] == 0  # from the prefill, before the press: the same path
    # knorm's prefill captures no queries, so the fused plan runs it, to the same noise
    assert difference.max() < 0.3 and difference.mean() < 0.1, difference


def test_a_preempted_pressed_request_is_recomputed_and_pressed_again() -> None:
    """A pool of 19 blocks: the pressed request, admitted second, is preempted while both
    generate, recomputed (prefill stopping at press_at, pressed again, its generated tokens
    after) and ends with the tokens it gets alone."""
    llm = LLM(
        "smollm2",
        weight_format="float",
        block_size=BLOCK_SIZE,
        max_model_len=256,
        kv_cache_memory=str(19 * 737_280),  # SmolLM2's float32 block: 737,280 bytes
        max_num_batched_tokens=64,
    )
    assert llm.engine.kv_cache.pools[0].num_usable_blocks == 19
    pressed_prompt = {"prompt_token_ids": ids(llm, DOC * 3)[:150]}
    plain_prompt = {"prompt_token_ids": ids(llm, DOC[::-1] * 3)[:150]}
    press = KVPress("knorm", 0.75)
    pressed = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, kv_press=press)
    plain = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    alone = llm.generate(pressed_prompt, pressed)[0]
    llm.engine.kv_cache.reset_prefix_cache()
    together = llm.generate([plain_prompt, pressed_prompt], [plain, pressed])
    assert together[1].metrics.num_preemptions >= 1
    assert together[1].outputs[0].token_ids == alone.outputs[0].token_ids
    assert together[1].metrics.kv_pressed_bytes == alone.metrics.kv_pressed_bytes
    assert llm.engine.kv_cache.num_used_blocks() == [0]
    llm.engine.kv_cache.check_integrity()
