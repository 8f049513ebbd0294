"""The tova press keeps a fixed KV budget while a request generates (issue 21): its prompt is
pressed to the budget, then each time its cache holds the budget plus a block it is pressed
back, so its blocks never pass ceil((budget + block) / block), in the cache manager's tables
and in `kv_peak_bytes`; tova and plain requests share a batch, and a budget the text never
fills changes no token. On SmolLM2's float weights (the session's engine)."""

from __future__ import annotations

import math

from kvlm import LLM, KVPress, SamplingParams
from kvlm.engine.request import Request

BLOCK_SIZE = 16  # EngineConfig's default, the session engine's
DOC = (
    "The cache keeps the keys and values of every token a request has seen, in blocks of "
    "sixteen tokens. A press scores each cached token per layer and per head, keeps the "
    "tokens attention needs and gives the other blocks back to the pool. "
)


def greedy(max_tokens: int, press: KVPress | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, kv_press=press)


def run_watching(
    llm: LLM, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[list[Request], list[int]]:
    """Run the prompts as one batch; per request, the most blocks its table held after any
    step once it had sampled (its prompt computed and, with a press, pressed)."""
    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    requests = [
        engine.requests[engine.add_request(None, p, sp)]
        for p, sp in zip(prompts, params, strict=True)
    ]
    most = [0] * len(requests)
    while engine.has_unfinished():
        engine.step()
        for i, request in enumerate(requests):
            sampled = len(request.token_ids) > request.num_prompt_tokens
            if sampled and engine.kv_cache.holds(request.request_id):
                (table,) = engine.kv_cache.block_tables(request.request_id)
                assert len(table) == math.ceil(request.num_cache_tokens(0) / BLOCK_SIZE)
                most[i] = max(most[i], len(table))
    assert engine.kv_cache.num_used_blocks() == [0]
    engine.kv_cache.check_integrity()
    return requests, most


def output_ids(request: Request) -> list[int]:
    return request.token_ids[request.num_prompt_tokens :]


def test_the_budget_holds_through_a_long_greedy_decode(smollm2_llm: LLM) -> None:
    """One batch, 34 tokens each: a tova prompt of 40 pressed to 16 at once and again every
    16 tokens, a tova prompt of 10 first pressed at 32 cached, and a plain prompt of 10 that
    ends with the tokens it gets alone. Decode steps are few: a shared CPU runs them slowly."""
    budget, new_tokens = BLOCK_SIZE, 34
    tokenizer = smollm2_llm.tokenizer
    long, short = tokenizer.encode(DOC * 2)[:40], tokenizer.encode(DOC[::-1])[:10]
    tova = greedy(new_tokens, KVPress("tova", budget=budget))
    requests, most = run_watching(
        smollm2_llm, [long, short, short], [tova, tova, greedy(new_tokens)]
    )
    bound = math.ceil((budget + BLOCK_SIZE) / BLOCK_SIZE)  # 2
    assert most == [bound, bound, math.ceil((10 + new_tokens - 1) / BLOCK_SIZE)]  # plain: 3
    for request in requests:
        assert len(output_ids(request)) == new_tokens
    # computed 73 and 43: pressed (to 16) at 40, 56 and 72, and at 32
    assert [r.num_dropped_tokens for r in requests] == [(24 + 16 + 16,), (16,), ()]
    page = smollm2_llm.engine.kv_specs[0].page_nbytes
    peaks = [r.metrics.kv_peak_bytes // page for r in requests]
    assert peaks == [3, bound, 3]  # the long prompt's 3 blocks before its first press
    assert requests[0].metrics.kv_pressed_bytes == page  # 16 tokens: one block
    [plain] = smollm2_llm.generate({"prompt_token_ids": short}, greedy(new_tokens))
    assert output_ids(requests[2]) == list(plain.outputs[0].token_ids)


def test_a_budget_the_text_never_fills_changes_no_token(smollm2_llm: LLM) -> None:
    """Budget = prompt + new tokens: the cache never holds it plus a block, so no token is
    dropped, and the press's no-op run after the prompt leaves the greedy output as that of a
    plain request beside it."""
    new_tokens = 12
    prompt = smollm2_llm.tokenizer.encode(DOC)[:20]
    press = KVPress("tova", budget=len(prompt) + new_tokens)
    requests, _ = run_watching(
        smollm2_llm, [prompt, prompt], [greedy(new_tokens, press), greedy(new_tokens)]
    )
    assert requests[0].num_dropped_tokens == () and requests[0].press_at is not None
    assert output_ids(requests[0]) == output_ids(requests[1])
