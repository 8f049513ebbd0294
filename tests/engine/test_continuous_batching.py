"""Requests joining a running batch: same tokens as alone, and decodes keep flowing meanwhile."""

from __future__ import annotations

from kvlm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
PROMPTS = ["The capital of France is", "Water is made of", "My favourite colour is"]


def test_requests_joining_mid_decode_match_each_alone(smollm2_llm: LLM) -> None:
    alone = [smollm2_llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    engine = smollm2_llm.engine
    ids: list[str] = []
    tokens: dict[str, list[int]] = {}  # each step's outputs carry only the new tokens

    def step() -> None:
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)

    for prompt in PROMPTS:  # each new request arrives while the earlier ones are decoding
        ids.append(engine.add_request(prompt, None, GREEDY))
        for _ in range(5):
            step()
    while engine.has_unfinished():
        step()
        engine.kv_cache.check_integrity()
    assert [tokens[i] for i in ids] == alone


def test_long_prompt_prefills_in_chunks_beside_running_decodes() -> None:
    llm = LLM("smollm2", max_num_batched_tokens=64)
    engine = llm.engine
    # ignore_eos: the short request must still be decoding when the long prefill ends
    decode = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    short = engine.add_request(PROMPTS[0], None, decode)
    engine.step()  # the short prompt is prefilled and starts decoding
    long_prompt = {"prompt_token_ids": [42 + i % 500 for i in range(600)]}
    long = engine.add_request(None, long_prompt["prompt_token_ids"], GREEDY)
    prefill_steps = 0
    while True:
        outputs = {o.request_id: o for o in engine.step()}
        if long in outputs:  # the long prompt's first token: its prefill is complete
            break
        prefill_steps += 1
        assert short in outputs, "the running decode stalled while the long prompt loaded"
    # 600 tokens, 63 per step beside the decode: 10 chunks, the 10th samples the first token
    assert prefill_steps == -(-600 // 63) - 1
    engine.abort(short)
    engine.abort(long)
    assert engine.kv_cache_bytes_used() == 0
