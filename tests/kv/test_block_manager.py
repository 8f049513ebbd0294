"""Block manager: exact block ids, prefix hits, LRU eviction, and a randomized workload."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlm.kv.block_manager import BlockManager, OutOfBlocksError


def test_allocate_hands_out_lowest_free_ids_in_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 5)  # 5 tokens -> 2 blocks
    bm.allocate("b", 4)  # exactly 1 block
    assert bm.block_table("a") == [0, 1]
    assert bm.block_table("b") == [2]
    assert bm.num_free_blocks == 5
    bm.check_integrity()


def test_append_across_block_boundary_adds_one_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 4)
    assert bm.block_table("a") == [0]
    bm.allocate("a", 4)  # still fits: no new block
    assert bm.block_table("a") == [0]
    bm.allocate("a", 5)  # token 5 crosses into a second block
    assert bm.block_table("a") == [0, 1]
    bm.check_integrity()


def test_free_returns_blocks_tail_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    bm.allocate("a", 12)
    assert bm.block_table("a") == [0, 1, 2]
    bm.free("a")
    assert list(bm.free_queue) == [3, 2, 1, 0]  # the tail is reused (evicted) first
    bm.allocate("b", 4)
    assert bm.block_table("b") == [3]
    bm.check_integrity()


def test_out_of_blocks_raises_with_numbers_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("a", 8)
    with pytest.raises(OutOfBlocksError, match="needs 2 more blocks of 4 tokens; 1 free of 3"):
        bm.allocate("b", 8)
    assert "b" not in bm.block_tables
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate("a", 13)
    bm.check_integrity()


def test_prefix_hit_shares_full_blocks_and_counts_refs() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))  # blocks [0..3], [4..7], partial [8, 9]
    bm.allocate("a", len(prompt))
    bm.cache_full_blocks("a", prompt, num_computed_tokens=10)
    cached = bm.find_cached_prefix(prompt + [99])
    assert [b.block_id for b in cached] == [0, 1]
    bm.allocate("b", 11, cached)
    assert bm.block_table("b") == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    bm.check_integrity()


def test_prefix_hit_leaves_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    bm.allocate("a", 8)
    bm.cache_full_blocks("a", prompt, 8)
    # the same 8 tokens again: only the first block may be reused
    assert [b.block_id for b in bm.find_cached_prefix(prompt)] == [0]


def test_freed_hashed_blocks_stay_reusable_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    bm.free("a")
    assert list(bm.free_queue) == [2, 3, 1, 0]
    hit = bm.find_cached_prefix([1, 2, 3, 4, 5])
    assert [b.block_id for b in hit] == [0, 1]
    bm.allocate("b", 6)  # no reuse asked: takes 2, 3, then evicts 1 (freed before 0)
    assert bm.block_table("b") == [2, 3, 1]
    assert [b.block_id for b in bm.find_cached_prefix([1, 2, 3, 4, 5])] == [0]
    bm.check_integrity()


def test_cache_salt_isolates_prefixes() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4, cache_salt="tenant-1")
    assert bm.find_cached_prefix([1, 2, 3, 4, 5], cache_salt="tenant-2") == []
    assert bm.find_cached_prefix([1, 2, 3, 4, 5]) == []
    assert len(bm.find_cached_prefix([1, 2, 3, 4, 5], cache_salt="tenant-1")) == 2


def test_duplicate_content_keeps_first_block_as_the_cached_one() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm.allocate("b", 2)
    bm.cache_full_blocks("a", [7, 8], 2)
    bm.cache_full_blocks("b", [7, 8], 2)
    assert bm.blocks[0].block_hash is not None and bm.blocks[1].block_hash is None
    bm.free("a")
    bm.free("b")
    bm.check_integrity()


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    assert bm.find_cached_prefix([1, 2, 3, 4, 5]) == []


def _random_workload(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=12, block_size=4)
    live: dict[str, list[int]] = {}
    vocab = [1, 2, 3]  # a tiny vocabulary makes shared prefixes common
    for step in range(steps):
        action = rng.random()
        if action < 0.4 or not live:
            request_id = f"r{step}"
            tokens = [rng.choice(vocab) for _ in range(rng.randint(1, 14))]
            cached = bm.find_cached_prefix(tokens)
            if bm.can_allocate(request_id, len(tokens), cached):
                bm.allocate(request_id, len(tokens), cached)
                bm.cache_full_blocks(request_id, tokens, len(tokens))
                live[request_id] = tokens
            else:
                with pytest.raises(OutOfBlocksError):
                    bm.allocate(request_id, len(tokens), cached)
        elif action < 0.75:
            request_id = rng.choice(sorted(live))
            tokens = live[request_id]
            if bm.can_allocate(request_id, len(tokens) + 1):
                tokens.append(rng.choice(vocab))
                bm.allocate(request_id, len(tokens))
                bm.cache_full_blocks(request_id, tokens, len(tokens))
        else:
            request_id = rng.choice(sorted(live))
            del live[request_id]
            bm.free(request_id)
        bm.check_integrity()
    for request_id in list(live):
        bm.free(request_id)
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("seed", range(5))
def test_randomized_workload_keeps_invariants(seed: int) -> None:
    _random_workload(seed, steps=400)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_randomized_workload_property(seed: int) -> None:
    _random_workload(seed, steps=60)


def test_preempted_request_readmits_with_prefix_hit() -> None:
    """Free a running request (preemption), then readmit it: its full blocks are hits."""
    bm = BlockManager(num_blocks=6, block_size=2)
    tokens = [5, 6, 7, 8, 9]
    bm.allocate("a", 5)
    bm.cache_full_blocks("a", tokens, 5)
    assert bm.block_table("a") == [0, 1, 2]
    bm.free("a")  # preempted: blocks 2, 1, 0 return to the free queue, hashes kept
    bm.allocate("b", 6)  # another request takes 3, 4, 5 first, then nothing else
    assert bm.block_table("b") == [3, 4, 5]
    cached = bm.find_cached_prefix(tokens)
    assert [b.block_id for b in cached] == [0, 1]
    assert bm.can_allocate("a", 5, cached)
    bm.allocate("a", 5, cached)
    assert bm.block_table("a") == [0, 1, 2]
    bm.check_integrity()
