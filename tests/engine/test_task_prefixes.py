"""Task prefixes: a shared document registered once (pinned), or reused by prefix caching."""

from __future__ import annotations

import pydoc_data.topics

import pytest

from kvlm import LLM, InputError, SamplingParams
from kvlm.engine.task_prefixes import TaskPrefixes
from kvlm.kv.block_hash import extend_block_hashes

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
TASKS = [
    "\n\nClassify the topic of this text in one word:",
    "\n\nSummarise this text in one sentence:",
    "\n\nQuestion: which statement does this text describe? Answer:",
]
DOCUMENT = pydoc_data.topics.topics["assert"][:900]  # ~200 tokens


@pytest.fixture(scope="module")
def small_pool_llm() -> LLM:
    """22 blocks of 16 tokens: a few requests below fill the pool and evict each other."""
    return LLM("smollm2", kv_cache_memory="16MiB", max_model_len=256)


def _task_ids(llm: LLM, document_ids, task: str) -> list[int]:
    return [*document_ids, *llm.tokenizer.encode(task, add_special_tokens=False)]


def _fill_the_pool(llm: LLM) -> list[bytes]:
    """Run unrelated prompts until the pool has cycled; returns the first one's block hashes."""
    churn = [f"Note {i}: " + "the weather was mild and the sea was calm. " * 12 for i in range(8)]
    first = llm.generate(churn[0], GREEDY)[0].prompt_token_ids
    hashes: list[bytes] = []
    extend_block_hashes(hashes, first, len(first), llm.engine.kv_cache.block_size, None)
    llm.generate(churn[1:], GREEDY)
    assert llm.engine.kv_cache.pools[0].cached(hashes[0]) is None, "nothing was evicted"
    return hashes


def test_registered_prefix_survives_pool_pressure(small_pool_llm):
    llm = small_pool_llm
    prefix = llm.register_prefix("doc", DOCUMENT)
    assert prefix.token_ids == tuple(llm.tokenizer.encode(DOCUMENT))
    assert prefix.num_pinned_tokens == len(prefix.token_ids) // 16 * 16 >= 160
    try:
        _fill_the_pool(llm)
        for task in TASKS:
            out = llm.generate({"prompt_token_ids": _task_ids(llm, prefix.token_ids, task)}, GREEDY)
            assert out[0].metrics.num_cached_tokens == prefix.num_pinned_tokens
        llm.engine.kv_cache.check_integrity()
    finally:
        llm.unregister_prefix("doc")
    # unpinned, the document goes the way of any cached prefix under pressure
    _fill_the_pool(llm)
    out = llm.generate({"prompt_token_ids": _task_ids(llm, prefix.token_ids, TASKS[0])}, GREEDY)
    assert out[0].metrics.num_cached_tokens < prefix.num_pinned_tokens
    llm.engine.kv_cache.check_integrity()


def test_prefixes_sharing_blocks_stay_pinned_until_the_last_goes(small_pool_llm):
    llm = small_pool_llm
    head = DOCUMENT[:400]
    short, whole = llm.register_prefix("head", head), llm.register_prefix("whole", DOCUMENT)
    assert whole.block_ids[0][: len(short.block_ids[0])] == short.block_ids[0]
    llm.unregister_prefix("head")
    pool = llm.engine.kv_cache.pools[0]
    assert all(pool.blocks[i].pinned for i in whole.block_ids[0])
    llm.unregister_prefix("whole")
    assert not any(pool.blocks[i].pinned for i in whole.block_ids[0])
    llm.engine.kv_cache.check_integrity()


def test_tasks_over_one_document_share_its_prefill_through_prefix_caching(smollm2_llm):
    smollm2_llm.engine.kv_cache.reset_prefix_cache()
    document_ids = smollm2_llm.tokenizer.encode(pydoc_data.topics.topics["while"])
    outputs = [
        smollm2_llm.generate({"prompt_token_ids": _task_ids(smollm2_llm, document_ids, t)}, GREEDY)
        for t in TASKS
    ]
    full_blocks = len(document_ids) // 16 * 16
    cached = [o[0].metrics.num_cached_tokens for o in outputs]
    assert cached == [0, full_blocks, full_blocks]


def test_bad_registrations_are_refused(small_pool_llm):
    llm = small_pool_llm
    with pytest.raises(InputError, match="fewer than one block of 16: there is nothing to pin"):
        llm.register_prefix("tiny", "Hello")
    llm.register_prefix("doc", DOCUMENT)
    try:
        with pytest.raises(InputError, match="prefix 'doc' is already registered"):
            llm.register_prefix("doc", DOCUMENT)
    finally:
        llm.unregister_prefix("doc")
    with pytest.raises(InputError, match=r"no prefix named 'doc' is registered \(registered: none"):
        llm.unregister_prefix("doc")
    with pytest.raises(InputError, match="need the KV cache and enable_prefix_caching"):
        TaskPrefixes(None).check_new("doc", list(range(32)))


def test_gemma3_pins_its_local_layers_window_only(gemma3_llm):
    """840 tokens: the global layers pin every full block, the 512-token local layers only
    the blocks a query after the document still sees; a task still hits the whole document."""
    llm = gemma3_llm
    prefix = llm.register_prefix("with", pydoc_data.topics.topics["with"])
    try:
        global_blocks, local_blocks = prefix.block_ids
        assert len(global_blocks) == prefix.num_pinned_tokens // 16 >= 52
        assert len(local_blocks) == 512 // 16  # the window behind the document's end (ids of
        # another pool: each layer group has its own)
        out = llm.generate({"prompt_token_ids": _task_ids(llm, prefix.token_ids, TASKS[1])}, GREEDY)
        assert out[0].metrics.num_cached_tokens == prefix.num_pinned_tokens
    finally:
        llm.unregister_prefix("with")
    llm.engine.kv_cache.check_integrity()
