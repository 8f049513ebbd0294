"""The scheduler on its own, over a tiny in-memory cache (one group, blocks of 4 tokens, the
null block is 0): which tokens each step computes, what a token budget does to a prompt, prefix
hits, and preemption, with exact block ids. No model: `_step` stands in for the engine,
appending a token to every request whose known tokens were all computed."""

from __future__ import annotations

from kvlm.engine.request import Request, RequestStatus
from kvlm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.spec import KVCacheSpec
from kvlm.sampling import SamplingParams

BLOCK = 4
NEXT_TOKEN = 99  # what the stand-in sampler always picks


def _scheduler(num_blocks: int, budget: int = 64, prefix_caching: bool = True) -> Scheduler:
    """`num_blocks` blocks, the null block included (so one fewer to hand out)."""
    spec = KVCacheSpec((0,), 1, 4, BLOCK, "float32")
    cache = KVCacheManager([spec], [num_blocks], enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), cache)


def _request(request_id: str, token_ids: list[int]) -> Request:
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    return Request(request_id, None, list(token_ids), params, detokenizer=None)  # type: ignore[arg-type]


def _plan(batch: ScheduledBatch) -> list[tuple[str, int, int]]:
    """(request id, first token computed, tokens computed) per request of the batch."""
    return [
        (r.request_id, r.num_computed_tokens, n)
        for r, n in zip(batch.requests, batch.num_new_tokens, strict=True)
    ]


def _step(scheduler: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule, 'run' the batch, and sample a token where the engine would."""
    batch = scheduler.schedule()
    plan = _plan(batch)
    scheduler.update_after_step(batch)
    for request in batch.requests:
        if request.num_computed_tokens == len(request.token_ids):
            request.token_ids.append(NEXT_TOKEN)
    assert scheduler.cache is not None
    scheduler.cache.check_integrity()
    return plan


def _table(scheduler: Scheduler, request: Request) -> list[int]:
    assert scheduler.cache is not None
    return scheduler.cache.block_tables(request.request_id)[0]


def test_a_token_budget_splits_a_prompt_into_chunks() -> None:
    scheduler = _scheduler(num_blocks=10, budget=8)
    prompt = _request("p", list(range(20)))
    scheduler.add(prompt)
    assert _step(scheduler) == [("p", 0, 8)]
    assert _table(scheduler, prompt) == [1, 2]  # blocks for the chunk only
    assert _step(scheduler) == [("p", 8, 8)]
    assert prompt.token_ids == list(range(20))  # mid-prompt: nothing sampled yet
    assert _step(scheduler) == [("p", 16, 4)]  # the last chunk samples the first token
    assert prompt.token_ids == [*range(20), NEXT_TOKEN]
    assert _table(scheduler, prompt) == [1, 2, 3, 4, 5]  # token 20 opens block 5
    assert _step(scheduler) == [("p", 20, 1)]  # then one-token decodes


def test_decodes_continue_beside_a_chunked_prefill() -> None:
    scheduler = _scheduler(num_blocks=12, budget=8)
    short = _request("short", [1, 2, 3])
    scheduler.add(short)
    assert _step(scheduler) == [("short", 0, 3)]
    long = _request("long", list(range(100, 120)))
    scheduler.add(long)
    # Running requests first: the decode takes 1 token, the long prompt the other 7.
    assert _step(scheduler) == [("short", 3, 1), ("long", 0, 7)]
    assert _step(scheduler) == [("short", 4, 1), ("long", 7, 7)]
    assert _step(scheduler) == [("short", 5, 1), ("long", 14, 6)]  # 6 left of 20
    assert len(long.token_ids) == 21  # its prefill done, it sampled
    assert _step(scheduler) == [("short", 6, 1), ("long", 20, 1)]
    assert len(short.token_ids) == 3 + 5


def test_a_prefix_hit_leaves_the_last_token_to_compute() -> None:
    scheduler = _scheduler(num_blocks=10)
    first = _request("first", list(range(8)))  # exactly two full blocks
    scheduler.add(first)
    _step(scheduler)
    first_blocks = _table(scheduler, first)[:2]
    scheduler.finish(first)  # its named blocks stay cached in the free queue
    assert first.status == RequestStatus.FINISHED
    assert scheduler.cache is not None and not scheduler.cache.holds("first")

    # The same 8 tokens: both blocks are cached, but the last token must be computed for its
    # logits, so the hit stops at the block boundary before it.
    same = _request("same", list(range(8)))
    scheduler.add(same)
    assert _step(scheduler) == [("same", 4, 4)]
    assert _table(scheduler, same)[0] == first_blocks[0]
    assert same.metrics.num_cached_tokens == 4
    scheduler.finish(same)

    # One token more: both blocks hit and only the ninth token is computed.
    longer = _request("longer", [*range(8), 50])
    scheduler.add(longer)
    assert _step(scheduler) == [("longer", 8, 1)]
    assert _table(scheduler, longer)[:2] == first_blocks
    assert longer.metrics.num_cached_tokens == 8
    assert scheduler.stats.num_prefix_queries == 8 + 8 + 9
    assert scheduler.stats.num_prefix_hits == 0 + 4 + 8


def test_a_block_a_chunk_ends_inside_is_named_only_once_full() -> None:
    """Admission hashes the whole prompt, but a chunk of 6 tokens writes only rows 4-5 of
    block 2: a request with the same prompt, admitted while rows 6-7 are unwritten, hits
    block 1 only and computes tokens 4-7 itself."""
    scheduler = _scheduler(num_blocks=10, budget=6)
    first = _request("first", list(range(10)))
    scheduler.add(first)
    assert _step(scheduler) == [("first", 0, 6)]
    assert _table(scheduler, first) == [1, 2]
    scheduler.add(_request("same", list(range(10))))
    assert _step(scheduler) == [("first", 6, 4), ("same", 4, 2)]
    assert _table(scheduler, first) == [1, 2, 3]  # its own block 2: no copy-on-write


def test_a_request_is_not_preempted_over_its_own_partial_block() -> None:
    """3 blocks to hand out: after a chunk of 6 tokens the prompt's last 4 take the third.
    Block 2 is half written; named, it would need a copy before the next write, the pool
    has no block for it, so the request would preempt itself and come back with a hit on
    block 2's unwritten rows 6-7."""
    scheduler = _scheduler(num_blocks=4, budget=6)
    request = _request("r", list(range(10)))
    scheduler.add(request)
    assert _step(scheduler) == [("r", 0, 6)]
    assert _step(scheduler) == [("r", 6, 4)]
    assert request.metrics.num_preemptions == 0
    assert _table(scheduler, request) == [1, 2, 3]


def test_the_newest_request_is_preempted_for_an_older_ones_next_block() -> None:
    scheduler = _scheduler(num_blocks=6, prefix_caching=False)  # 5 blocks to hand out
    old = _request("old", list(range(7)))  # 2 blocks, 8 tokens after its first sample
    new = _request("new", list(range(10, 21)))  # 3 blocks
    scheduler.add(old)
    scheduler.add(new)
    assert _step(scheduler) == [("old", 0, 7), ("new", 0, 11)]
    assert _table(scheduler, old) == [1, 2] and _table(scheduler, new) == [3, 4, 5]
    assert _step(scheduler) == [("old", 7, 1), ("new", 11, 1)]  # token 8 fits both tables
    new_tokens = list(new.token_ids)  # the prompt and 2 generated tokens
    assert len(new_tokens) == 13

    # old's 9th token needs a third block and none is free: new, the newest, gives its three.
    assert _step(scheduler) == [("old", 8, 1)]
    assert new.status == RequestStatus.WAITING
    assert new.num_computed_tokens == 0 and new.metrics.num_preemptions == 1
    assert scheduler.stats.num_preemptions == 1
    assert scheduler.cache is not None and not scheduler.cache.holds("new")
    assert scheduler.cache.pools[0].num_free_blocks == 2  # 5 - old's 3
    assert _table(scheduler, old) == [1, 2, 5]  # the tail block is reused first

    # new needs 4 blocks for its 13 tokens: it waits until old finishes...
    assert _step(scheduler) == [("old", 9, 1)]
    scheduler.finish(old)
    # ...then recomputes all of them, its generated tokens kept, and samples the next one.
    assert _step(scheduler) == [("new", 0, 13)]
    assert new.token_ids == [*new_tokens, NEXT_TOKEN]
    assert new.status == RequestStatus.RUNNING
    # Free-queue order: what new gave back (less the block old took), then old's, tail first.
    assert _table(scheduler, new) == [4, 3, 5, 2]
    assert scheduler.stats.num_preemptions == 1


def test_the_newest_request_preempts_itself_when_it_cannot_grow() -> None:
    scheduler = _scheduler(num_blocks=5, prefix_caching=False)  # 4 blocks to hand out
    old = _request("old", list(range(7)))  # 8 tokens after its first sample: still 2 blocks
    new = _request("new", list(range(20, 28)))  # 9 tokens after its first: a third block
    scheduler.add(old)
    scheduler.add(new)
    assert _step(scheduler) == [("old", 0, 7), ("new", 0, 8)]  # 2 + 2 blocks: the pool is full
    # new is the newest running request, so it gives up its own blocks; old decodes on.
    assert _step(scheduler) == [("old", 7, 1)]
    assert new.status == RequestStatus.WAITING and new.metrics.num_preemptions == 1
    assert old.status == RequestStatus.RUNNING and old.metrics.num_preemptions == 0
    assert scheduler.cache is not None and not scheduler.cache.holds("new")
    assert scheduler.cache.pools[0].num_free_blocks == 2
