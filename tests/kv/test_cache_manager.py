"""Cache bookkeeping: exact block ids, prefix hits, LRU eviction, windows, sinks, and a
randomized workload with `check_integrity()` after every step. Block 0 is the null block, so
a fresh pool hands out 1, 2, 3, ..."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.block_pool import NULL_BLOCK_ID, OutOfBlocksError
from kvlm.kv.cache_manager import KVCacheManager, PrefixHit
from kvlm.kv.spec import KVCacheSpec


def spec(block_size: int, window: int | None = None, sinks: int = 0) -> KVCacheSpec:
    return KVCacheSpec((0,), 1, 4, block_size, "float32", window, sinks)


class Harness:
    """A KVCacheManager plus the token lists and hashes an engine would keep per request."""

    def __init__(self, specs: Sequence[KVCacheSpec], num_blocks: Sequence[int], **kw) -> None:
        self.cache = KVCacheManager(specs, num_blocks, **kw)
        self.hashes: dict[str, list[bytes]] = {}

    def block_hashes(self, request_id: str, tokens: list[int], salt: str | None = None):
        hashes = self.hashes.setdefault(request_id, [])
        extend_block_hashes(hashes, tokens, len(tokens), self.cache.block_size, salt)
        return hashes

    def find(self, tokens: list[int], salt: str | None = None) -> PrefixHit:
        hashes: list[bytes] = []
        extend_block_hashes(hashes, tokens, len(tokens), self.cache.block_size, salt)
        return self.cache.find_cached_prefix(hashes, len(tokens))

    def compute(self, request_id: str, tokens: list[int], salt: str | None = None) -> None:
        """Allocate for all of `tokens` and mark them computed (their full blocks named)."""
        self.cache.allocate(request_id, len(tokens))
        self.cache.cache_full_blocks(request_id, self.block_hashes(request_id, tokens, salt))

    def table(self, request_id: str, group: int = 0) -> list[int]:
        return self.cache.block_tables(request_id)[group]

    def free(self, request_id: str) -> None:
        self.cache.free(request_id)
        self.hashes.pop(request_id, None)


def ids(hit: PrefixHit, group: int = 0) -> list[int | None]:
    return [None if b is None else b.block_id for b in hit.blocks[group]]


def test_allocate_hands_out_lowest_free_ids_in_order() -> None:
    h = Harness([spec(4)], [9])
    h.cache.allocate("a", 5)  # 5 tokens -> 2 blocks
    h.cache.allocate("b", 4)  # exactly 1 block
    assert h.table("a") == [1, 2] and h.table("b") == [3]
    assert h.cache.pools[0].num_free_blocks == 5
    h.cache.allocate("a", 4)  # still fits: no new block
    h.cache.allocate("a", 9)  # crosses into a third block
    assert h.table("a") == [1, 2, 4]
    h.cache.check_integrity()


def test_free_returns_blocks_tail_first() -> None:
    h = Harness([spec(4)], [5], enable_prefix_caching=False)
    h.cache.allocate("a", 12)
    assert h.table("a") == [1, 2, 3]
    h.free("a")
    assert list(h.cache.pools[0].free_queue) == [4, 3, 2, 1]  # the tail is evicted first
    h.cache.allocate("b", 4)
    assert h.table("b") == [4]
    h.cache.check_integrity()


def test_out_of_blocks_raises_with_numbers_and_changes_nothing() -> None:
    h = Harness([spec(4)], [4])
    h.cache.allocate("a", 8)
    with pytest.raises(OutOfBlocksError, match="needs 2 more blocks of 4 tokens in layer group 0"):
        h.cache.allocate("b", 8)
    assert not h.cache.holds("b")
    assert h.cache.pools[0].num_free_blocks == 1
    assert not h.cache.can_allocate("a", 13)
    h.cache.check_integrity()


def test_allocation_is_all_groups_or_none() -> None:
    h = Harness([spec(4), spec(4, window=4)], [9, 3])
    with pytest.raises(OutOfBlocksError, match="layer group 1; 2 free of 2"):
        h.cache.allocate("a", 12)  # group 1 needs 3 blocks during this step
    assert not h.cache.holds("a") and h.cache.pools[0].num_free_blocks == 8


def test_prefix_hit_shares_full_blocks_and_counts_refs() -> None:
    h = Harness([spec(4)], [9])
    prompt = list(range(10))  # blocks [0..3], [4..7], partial [8, 9]
    h.compute("a", prompt)
    hit = h.find(prompt + [99])
    assert ids(hit) == [1, 2] and hit.num_tokens == 8
    h.cache.allocate("b", 11, hit)
    assert h.table("b") == [1, 2, 4]
    assert [h.cache.pools[0].blocks[i].ref_count for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    h.cache.check_integrity()


def test_prefix_hit_leaves_last_token_to_compute() -> None:
    h = Harness([spec(4)], [9])
    prompt = list(range(8))
    h.compute("a", prompt)
    assert ids(h.find(prompt)) == [1]  # the same 8 tokens again: only the first block


def test_freed_hashed_blocks_stay_reusable_until_evicted_lru() -> None:
    h = Harness([spec(2)], [5])
    h.compute("a", [1, 2, 3, 4])
    h.free("a")
    assert list(h.cache.pools[0].free_queue) == [3, 4, 2, 1]
    assert ids(h.find([1, 2, 3, 4, 5])) == [1, 2]
    h.cache.allocate("b", 6)  # no reuse asked: takes 3, 4, then evicts 2 (freed before 1)
    assert h.table("b") == [3, 4, 2]
    assert ids(h.find([1, 2, 3, 4, 5])) == [1]
    h.cache.check_integrity()


def test_cache_salt_isolates_prefixes() -> None:
    h = Harness([spec(2)], [9])
    h.compute("a", [1, 2, 3, 4], salt="tenant-1")
    assert h.find([1, 2, 3, 4, 5], salt="tenant-2").num_tokens == 0
    assert h.find([1, 2, 3, 4, 5]).num_tokens == 0
    assert h.find([1, 2, 3, 4, 5], salt="tenant-1").num_tokens == 4


def test_duplicate_content_keeps_first_block_as_the_cached_one() -> None:
    h = Harness([spec(2)], [5])
    h.compute("a", [7, 8])
    h.compute("b", [7, 8])
    blocks = h.cache.pools[0].blocks
    assert blocks[1].block_hash is not None and blocks[2].block_hash is None
    h.free("a")
    h.free("b")
    h.cache.check_integrity()


def test_prefix_caching_off_never_hits() -> None:
    h = Harness([spec(2)], [5], enable_prefix_caching=False)
    h.compute("a", [1, 2, 3, 4])
    assert h.find([1, 2, 3, 4, 5]).num_tokens == 0


def test_preempted_request_readmits_with_prefix_hit() -> None:
    """Free a running request (preemption), then readmit it: its full blocks are hits."""
    h = Harness([spec(2)], [7])
    tokens = [5, 6, 7, 8, 9]
    h.compute("a", tokens)
    assert h.table("a") == [1, 2, 3]
    h.free("a")  # preempted: blocks 3, 2, 1 return to the free queue, hashes kept
    h.cache.allocate("b", 6)  # another request takes 4, 5, 6 first
    assert h.table("b") == [4, 5, 6]
    hit = h.find(tokens)
    assert ids(hit) == [1, 2]
    assert h.cache.can_allocate("a", 5, hit)
    h.cache.allocate("a", 5, hit)
    assert h.table("a") == [1, 2, 3]
    h.cache.check_integrity()


def test_window_frees_blocks_behind_it_and_stays_flat() -> None:
    """Window 4, blocks of 2: the next query at position p reads keys p-3 .. p."""
    h = Harness([spec(2, window=4)], [6])
    tokens = list(range(6))
    h.compute("a", tokens)
    assert h.table("a") == [1, 2, 3]
    h.cache.remove_skipped("a", 6)  # next query at 6 reads 3..6: block 0 (tokens 0, 1) goes
    assert h.table("a") == [NULL_BLOCK_ID, 2, 3]
    for n in range(7, 40):
        h.cache.remove_skipped("a", n - 1)
        h.cache.allocate("a", n)
        assert h.cache.groups[0].num_held("a") <= 3
        h.cache.check_integrity()
    assert h.cache.bytes_held("a") == 3 * h.cache.specs[0].page_nbytes


def test_sinks_keep_the_first_blocks() -> None:
    h = Harness([spec(2, window=4, sinks=2)], [8])
    h.compute("a", list(range(12)))
    h.cache.remove_skipped("a", 12)  # next query at 12 reads 9..12 and the sinks 0, 1
    assert h.table("a") == [1, NULL_BLOCK_ID, NULL_BLOCK_ID, NULL_BLOCK_ID, 5, 6]
    h.cache.check_integrity()


def test_window_group_hit_needs_only_its_window() -> None:
    """A full group and a window-4 group. After the window group let go of old blocks, a
    prefix hit is still whole: the window group only needs the blocks its next query reads."""
    h = Harness([spec(2), spec(2, window=4)], [9, 9])
    tokens = list(range(8))
    h.compute("a", tokens)
    h.cache.remove_skipped("a", 8)  # window group keeps blocks 2, 3 (tokens 4..7)
    assert h.table("a", 1) == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4]
    hit = h.find(tokens + [100])
    assert hit.num_tokens == 8
    assert ids(hit, 0) == [1, 2, 3, 4] and ids(hit, 1) == [None, None, 3, 4]
    h.cache.allocate("b", 9, hit)
    assert h.table("b", 1) == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4, 5]
    h.cache.check_integrity()
    # A hit ending earlier needs a block the window group let go of: freed blocks keep their
    # hash in the free queue, so it is revived rather than recomputed.
    shorter = h.find(tokens[:6] + [100])
    assert shorter.num_tokens == 6 and ids(shorter, 1) == [None, 2, 3]
    assert h.cache.pools[1].blocks[2].ref_count == 0


def _random_workload(seed: int, steps: int, specs: Sequence[KVCacheSpec]) -> None:
    rng = random.Random(seed)
    h = Harness(specs, [13] * len(specs))
    live: dict[str, list[int]] = {}
    vocab = [1, 2, 3]  # a tiny vocabulary makes shared prefixes common
    for step in range(steps):
        action = rng.random()
        if action < 0.4 or not live:
            request_id = f"r{step}"
            tokens = [rng.choice(vocab) for _ in range(rng.randint(1, 14))]
            hit = h.find(tokens)
            if h.cache.can_allocate(request_id, len(tokens), hit):
                h.cache.allocate(request_id, len(tokens), hit)
                h.cache.cache_full_blocks(request_id, h.block_hashes(request_id, tokens))
                live[request_id] = tokens
            else:
                with pytest.raises(OutOfBlocksError):
                    h.cache.allocate(request_id, len(tokens), hit)
        elif action < 0.75:
            request_id = rng.choice(sorted(live))
            tokens = live[request_id]
            h.cache.remove_skipped(request_id, len(tokens))
            if h.cache.can_allocate(request_id, len(tokens) + 1):
                tokens.append(rng.choice(vocab))
                h.cache.allocate(request_id, len(tokens))
                h.cache.cache_full_blocks(request_id, h.block_hashes(request_id, tokens))
        else:
            request_id = rng.choice(sorted(live))
            del live[request_id]
            h.free(request_id)
        h.cache.check_integrity()
    for request_id in list(live):
        h.free(request_id)
    h.cache.check_integrity()
    assert all(p.num_free_blocks == p.num_usable_blocks for p in h.cache.pools)


LAYOUTS = {
    "full": [spec(4)],
    "full+window": [spec(4), spec(4, window=6)],
    "window+sinks": [spec(4, window=5, sinks=3)],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", range(3))
def test_randomized_workload_keeps_invariants(seed: int, layout: str) -> None:
    _random_workload(seed, steps=300, specs=LAYOUTS[layout])


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.sampled_from(sorted(LAYOUTS)))
def test_randomized_workload_property(seed: int, layout: str) -> None:
    _random_workload(seed, steps=60, specs=LAYOUTS[layout])
