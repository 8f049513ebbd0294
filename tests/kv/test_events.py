"""The cache event log: exact changes per operation, and, over a random workload, that replaying
the drained changes onto a mirror always gives the pool's and the tables' true state (so no
change goes unreported)."""

from __future__ import annotations

import random

import pytest

from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.events import BlockState, KVEventLog, block_state
from kvlm.kv.spec import KVCacheSpec

BLOCK_SIZE = 4


def spec(window: int | None = None, sinks: int = 0) -> KVCacheSpec:
    return KVCacheSpec((0,), 1, 4, BLOCK_SIZE, "float32", window, sinks)


def hashes(tokens: list[int]) -> list[bytes]:
    out: list[bytes] = []
    extend_block_hashes(out, tokens, len(tokens), BLOCK_SIZE, None)
    return out


def states(cache: KVCacheManager, group: int = 0) -> list[BlockState]:
    return [block_state(b) for b in cache.pools[group].blocks]


def test_each_operation_reports_the_blocks_and_tables_it_changed() -> None:
    cache = KVCacheManager([spec()], [8])
    log = KVEventLog(cache)
    a = list(range(6))
    cache.allocate("a", 6)
    changes = log.drain()
    assert changes.block_ids == [[1, 2]] and changes.request_ids == ["a"]
    cache.cache_full_blocks("a", hashes(a))  # names block 1 (the only full one)
    changes = log.drain()
    assert changes.block_ids == [[1]] and changes.request_ids == []
    cache.allocate("a", 7)  # fits in block 2: nothing changes
    assert log.drain().block_ids == [[]]
    b = a[:4] + [40, 41]
    hit = cache.find_cached_prefix(hashes(b), len(b))
    cache.allocate("b", 6, hit)
    changes = log.drain()
    assert changes.block_ids == [[1, 3]] and changes.request_ids == ["b"]
    assert states(cache)[1:4] == [BlockState.SHARED, BlockState.USED, BlockState.USED]
    cache.free("a")
    changes = log.drain()
    assert changes.block_ids == [[1, 2]] and changes.request_ids == ["a"]
    assert states(cache)[1:3] == [BlockState.USED, BlockState.FREE]
    cache.free("b")
    log.drain()
    assert states(cache)[1:4] == [BlockState.CACHED, BlockState.FREE, BlockState.FREE]
    cache.reset_prefix_cache()
    assert log.drain().block_ids == [[1]]
    assert states(cache)[1] == BlockState.FREE


def test_pins_and_windows_are_reported() -> None:
    cache = KVCacheManager([spec(window=4, sinks=2)], [10])
    log = KVEventLog(cache)
    pool = cache.pools[0]
    pool.pin(pool.blocks[5])
    assert log.drain().block_ids == [[5]] and block_state(pool.blocks[5]) == BlockState.PINNED
    cache.allocate("w", 16)  # blocks 1-4 (5 is pinned, so not free)
    log.drain()
    cache.remove_skipped("w", 4)  # the window still reaches every block
    assert log.drain().request_ids == []
    cache.remove_skipped("w", 16)  # the query at 16 reads 13-16: blocks 2, 3 go, sink 1 stays
    changes = log.drain()
    assert changes.block_ids == [[2, 3]] and changes.request_ids == ["w"]
    assert cache.block_tables("w") == [[1, 0, 0, 4]]


def test_nothing_is_recorded_once_detached_and_one_log_per_cache() -> None:
    cache = KVCacheManager([spec()], [4])
    log = KVEventLog(cache)
    with pytest.raises(RuntimeError, match="already has an event log"):
        KVEventLog(cache)
    log.detach()
    cache.allocate("a", 4)
    assert log.drain().block_ids == [[]] and log.drain().request_ids == []
    assert cache.pools[0].events is None and cache.groups[0].events is None


@pytest.mark.parametrize("seed", range(4))
def test_replayed_changes_mirror_the_cache_under_a_random_workload(seed: int) -> None:
    rng = random.Random(seed)
    specs = [spec(), spec(window=6, sinks=rng.choice([0, 2]))]
    cache = KVCacheManager(specs, [24, 24])
    log = KVEventLog(cache)
    mirror_states = [states(cache, g) for g in range(2)]
    mirror_tables: dict[str, list[list[int]]] = {}
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(6)]
    live: dict[str, list[int]] = {}
    for step in range(200):
        op = rng.random()
        if op < 0.4 and len(live) < 4:
            rid, tokens = f"r{step}", list(rng.choice(prompts))
            hit = cache.find_cached_prefix(hashes(tokens), len(tokens))
            if cache.can_allocate(rid, len(tokens), hit):
                cache.allocate(rid, len(tokens), hit)
                cache.cache_full_blocks(rid, hashes(tokens))
                live[rid] = tokens
        elif op < 0.8 and live:
            rid = rng.choice(list(live))
            tokens = live[rid]
            if cache.can_allocate(rid, len(tokens) + 1):
                tokens.append(rng.randrange(3))
                cache.allocate(rid, len(tokens))
                cache.cache_full_blocks(rid, hashes(tokens))
                cache.remove_skipped(rid, len(tokens))
        elif live:
            rid = rng.choice(list(live))
            cache.free(rid)
            del live[rid]
        changes = log.drain()
        for g, ids in enumerate(changes.block_ids):
            for i in ids:
                mirror_states[g][i] = block_state(cache.pools[g].blocks[i])
        for rid in changes.request_ids:
            if cache.holds(rid):
                mirror_tables[rid] = [list(t) for t in cache.block_tables(rid)]
            else:
                del mirror_tables[rid]
        assert mirror_states == [states(cache, g) for g in range(2)]
        assert mirror_tables == {rid: cache.block_tables(rid) for rid in live}
        cache.check_integrity()
