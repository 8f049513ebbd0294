"""Prefix adapters in the engine: mixed batches, prefix hits, pinning under eviction, refusals."""

from __future__ import annotations

import pytest

from kvlm import LLM, InputError, SamplingParams
from kvlm.engine.config import EngineConfig, EngineConfigError
from kvlm.kv.block_hash import extend_block_hashes

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
]


def _tokens(llm: LLM, prompts, adapters) -> list[list[int]]:
    out = llm.generate(prompts, GREEDY, prefix_adapter=adapters)
    return [o.outputs[0].token_ids for o in out]


def test_mixed_batch_equals_each_alone(smollm2_with_adapters):
    llm = smollm2_with_adapters
    adapters = ["twenty", "sixteen", None]
    batch = _tokens(llm, PROMPTS, adapters)
    llm.engine.kv_cache.reset_prefix_cache()
    alone = [_tokens(llm, [p], a)[0] for p, a in zip(PROMPTS, adapters, strict=True)]
    assert batch == alone
    # each adapter changes what the same prompt generates
    same_prompt = _tokens(llm, [PROMPTS[0]] * 3, ["twenty", "sixteen", None])
    assert len({tuple(t) for t in same_prompt}) == 3
    llm.engine.kv_cache.check_integrity()


def test_adapter_requests_share_prefix_hits_and_salts(smollm2_with_adapters):
    llm = smollm2_with_adapters
    prompt = "Once upon a time, in a kingdom by the sea, there lived a king who loved maps."
    num_prompt = len(llm.tokenizer.encode(prompt))
    first = llm.generate(prompt, GREEDY, prefix_adapter="twenty")[0]
    again = llm.generate(prompt, GREEDY, prefix_adapter="twenty")[0]
    salted = llm.generate(prompt, GREEDY, cache_salt="tenant-a", prefix_adapter="twenty")[0]
    assert first.metrics.num_prompt_tokens == num_prompt  # the virtual tokens are not counted
    assert first.metrics.num_cached_tokens == 0
    # the second run reuses every full block after the virtual tokens: (20 + n - 1) // 16 * 16 - 20
    assert again.metrics.num_cached_tokens == (20 + num_prompt - 1) // 16 * 16 - 20
    assert salted.metrics.num_cached_tokens == 0  # its own salt: only the adapter is shared
    tokens = {tuple(o.outputs[0].token_ids) for o in (first, again, salted)}
    assert len(tokens) == 1
    plain = llm.generate(prompt, GREEDY)[0]  # the base model shares no block with the adapter
    assert plain.metrics.num_cached_tokens == 0


def test_adapter_blocks_stay_pinned_under_pool_pressure(smollm2_adapter_settings):
    # 28 blocks of 16 tokens; each request below needs about 7 (20 virtual + prompt + output)
    llm = LLM("smollm2", kv_cache_memory="20MiB", **smollm2_adapter_settings)
    cache, adapters = llm.engine.kv_cache, llm.engine.prefix_adapters
    before = _tokens(llm, PROMPTS[:1], "twenty")[0]
    churn = [f"Item {i}: " + "a long list of things to remember, " * 6 for i in range(12)]
    first_churn = llm.generate(churn[0], GREEDY)[0]
    hashes: list[bytes] = []
    ids = first_churn.prompt_token_ids
    extend_block_hashes(hashes, ids, len(ids), cache.block_size, None)
    outputs = llm.generate(churn[1:], GREEDY, prefix_adapter=["twenty", None] * 5 + [None])
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outputs)
    assert cache.pools[0].cached(hashes[0]) is None, "the churn evicted nothing"
    assert llm.engine.scheduler.stats.num_preemptions > 0, "the churn preempted nothing"
    pool = cache.pools[0]
    for name in ("twenty", "sixteen"):
        prefix = adapters.get(name)
        for block_id, block_hash in zip(prefix.run.blocks[0], prefix.block_hashes, strict=False):
            block = pool.blocks[block_id]
            assert block.pinned and pool.cached(block_hash) is block
    cache.check_integrity()
    assert _tokens(llm, PROMPTS[:1], "twenty")[0] == before


def test_int8_kv_with_an_adapter_runs(smollm2_adapter_settings):
    llm = LLM("smollm2", kv_cache_dtype="int8", kv_cache_memory="16MiB", **smollm2_adapter_settings)
    with_adapter = _tokens(llm, PROMPTS[:1], "twenty")[0]
    assert len(with_adapter) == GREEDY.max_tokens
    assert with_adapter != _tokens(llm, PROMPTS[:1], None)[0]


def test_unknown_adapter_is_refused(smollm2_with_adapters):
    with pytest.raises(InputError, match=r"unknown prefix adapter 'nope'.*'sixteen', 'twenty'"):
        smollm2_with_adapters.generate("Hello", GREEDY, prefix_adapter="nope")
    with pytest.raises(InputError, match="2 prefix adapters for 1 prompts"):
        smollm2_with_adapters.generate("Hello", GREEDY, prefix_adapter=["twenty", None])
    assert not smollm2_with_adapters.engine.has_unfinished()


def test_virtual_tokens_count_against_the_context(smollm2_with_adapters):
    llm = smollm2_with_adapters
    ids = [42] * (llm.engine.max_model_len - 20)  # fits alone, not after 20 virtual tokens
    with pytest.raises(InputError, match="after the prefix adapter's 20; the context is 256"):
        llm.generate({"prompt_token_ids": ids}, GREEDY, prefix_adapter="twenty")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sliding_window": 64, "attention_sinks": 4}, "cannot run with attention_sinks"),
        ({"use_cache": False}, "need the KV cache and enable_prefix_caching"),
        ({"enable_prefix_caching": False}, "need the KV cache and enable_prefix_caching"),
    ],
)
def test_unsupported_combinations_are_refused(settings, message):
    with pytest.raises(EngineConfigError, match=message):
        EngineConfig(prefix_adapters={"a": "/nowhere"}, **settings)


@pytest.mark.parametrize("name", ["", "base:adapter"])
def test_bad_adapter_names_are_refused(name):
    with pytest.raises(EngineConfigError, match="without ':'"):
        EngineConfig(prefix_adapters={name: "/nowhere"})
