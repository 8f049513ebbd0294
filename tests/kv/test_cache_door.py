"""What reaches the cache only through `KVCacheManager`: counted pins, eviction listeners,
imported blocks and the event log, with exact block ids, ref counts and `check_integrity()`."""

from __future__ import annotations

import pytest

from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.block_pool import OutOfBlocksError
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.events import KVEventLog
from kvlm.kv.spec import KVCacheSpec

BLOCK_SIZE = 4


def spec(window: int | None = None) -> KVCacheSpec:
    return KVCacheSpec((0,), 1, 4, BLOCK_SIZE, "float32", window)


def hashes_of(tokens: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, len(tokens), BLOCK_SIZE, None)
    return hashes


def computed(cache: KVCacheManager, tokens: list[int]) -> None:
    """A request computed `tokens` and finished: its full blocks are named and free."""
    cache.allocate("r", len(tokens))
    cache.cache_full_blocks("r", hashes_of(tokens))
    cache.free("r")


def hit_of(cache: KVCacheManager, tokens: list[int]):
    return cache.find_cached_prefix(hashes_of(tokens), len(tokens) + 1)


def test_two_prefixes_sharing_blocks_each_hold_a_pin() -> None:
    cache = KVCacheManager([spec()], [9])
    doc = list(range(12))  # blocks 1, 2, 3
    computed(cache, doc)
    system = cache.pin(hit_of(cache, doc[:8]))  # a system prompt: the document's first two
    document = cache.pin(hit_of(cache, doc))
    assert (system, document) == (((1, 2),), ((1, 2, 3),))
    blocks = cache.pools[0].blocks
    assert [(b.ref_count, b.num_pins) for b in blocks[1:4]] == [(2, 2), (2, 2), (1, 1)]
    cache.check_integrity()
    cache.allocate("big", 5 * BLOCK_SIZE)  # every free block: the pinned ones stay
    assert cache.block_tables("big") == [[4, 5, 6, 7, 8]]
    with pytest.raises(OutOfBlocksError):
        cache.allocate("more", 4)
    cache.check_integrity()
    cache.unpin(document)
    assert [(b.ref_count, b.num_pins) for b in blocks[1:4]] == [(1, 1), (1, 1), (0, 0)]
    assert hit_of(cache, doc).num_tokens == 12  # block 3 is free but still named
    cache.check_integrity()
    cache.unpin(system)
    assert not any(b.pinned for b in blocks)
    assert list(cache.pools[0].free_queue) == [3, 2, 1]  # the tail first: evicted first
    cache.check_integrity()
    with pytest.raises(AssertionError, match="not pinned"):
        cache.unpin(system)


def test_allocate_pinned_names_full_blocks_and_leaves_the_partial_one_unnamed() -> None:
    cache = KVCacheManager([spec(), spec(window=4)], [6, 6])
    tokens = list(range(6))
    run = cache.allocate_pinned(6, hashes_of(tokens))
    assert run == ((1, 2), (1, 2))
    for pool in cache.pools:
        assert [(b.ref_count, b.num_pins) for b in pool.blocks[1:3]] == [(1, 1), (1, 1)]
        assert pool.blocks[1].block_hash is not None and pool.blocks[2].block_hash is None
    cache.check_integrity()
    with pytest.raises(OutOfBlocksError, match="only 3 free"):
        cache.allocate_pinned(16, hashes_of(list(range(16))))


def test_every_evict_listener_hears_every_eviction_in_order() -> None:
    cache = KVCacheManager([spec()], [4])
    heard: list[tuple[str, int, int, bytes]] = []

    def first(group: int, block_id: int, block_hash: bytes) -> None:
        heard.append(("first", group, block_id, block_hash))

    def second(group: int, block_id: int, block_hash: bytes) -> None:
        heard.append(("second", group, block_id, block_hash))

    cache.add_evict_listener(first)
    cache.add_evict_listener(second)
    tokens = list(range(8))
    computed(cache, tokens)  # blocks 1, 2 named, free queue [3, 2, 1]
    names = hashes_of(tokens)
    cache.allocate("a", 8)  # takes 3 (unnamed), then 2 (named: evicted)
    assert heard == [("first", 0, 2, names[1]), ("second", 0, 2, names[1])]
    cache.remove_evict_listener(first)
    cache.allocate("a", 12)  # takes 1: only `second` is left to hear it
    assert heard[2:] == [("second", 0, 1, names[0])]
    cache.check_integrity()


def test_imported_blocks_are_named_free_and_head_evicted_last() -> None:
    cache = KVCacheManager([spec()], [6])
    tokens = list(range(12))
    computed(cache, tokens[:4])  # block 1 holds the first block already
    written: list[tuple[int, list[int], list[int]]] = []
    cache.import_blocks(hashes_of(tokens), [[0, 1, 2]], lambda *a: written.append(a))
    assert written == [(0, [1, 2], [2, 3])]  # positions 1, 2 of the indices into blocks 2, 3
    assert hit_of(cache, tokens).num_tokens == 12
    assert list(cache.pools[0].free_queue)[-3:] == [3, 2, 1]
    assert cache.num_used_blocks() == [0]
    cache.check_integrity()


def test_an_import_never_evicts_the_cached_head_it_builds_on() -> None:
    cache = KVCacheManager([spec()], [4])  # 3 usable blocks
    tokens = list(range(12))
    computed(cache, tokens[:4])  # block 1: the head
    cache.allocate("x", 8)
    cache.free("x")
    assert list(cache.pools[0].free_queue) == [1, 3, 2]  # the head would be taken first
    cache.import_blocks(hashes_of(tokens), [[1, 2]], lambda *a: None)
    assert hit_of(cache, tokens).num_tokens == 12  # 3 and 2 were taken, block 1 kept
    cache.check_integrity()


def test_a_failed_import_leaves_the_books_as_they_were() -> None:
    cache = KVCacheManager([spec()], [6])

    def broken(*_: object) -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        cache.import_blocks(hashes_of(list(range(8))), [[0, 1]], broken)
    assert hit_of(cache, list(range(8))).num_tokens == 0 and cache.num_used_blocks() == [0]
    cache.check_integrity()


def test_the_event_log_is_attached_and_detached_by_the_manager() -> None:
    cache = KVCacheManager([spec()], [4])
    log = KVEventLog(cache)
    assert cache.event_log is log
    cache.allocate("a", 4)
    assert log.drain().block_ids == [[1]]
    log.detach()
    assert cache.event_log is None
    KVEventLog(cache).detach()  # a new log may attach once the old one left


def test_fork_shares_every_block_and_copies_the_partial_one_on_first_write() -> None:
    cache = KVCacheManager([spec()], [9])
    cache.allocate("p", 6)  # blocks 1 (full) and 2 (2 of 4 tokens)
    cache.cache_full_blocks("p", hashes_of(list(range(6))))
    cache.fork("p", "c")
    blocks = cache.pools[0].blocks
    assert cache.block_tables("c") == [[1, 2]]
    assert [b.ref_count for b in blocks[1:3]] == [2, 2]
    cache.check_integrity()
    assert cache.copy_on_write("c", 6) == [(0, 2, 3)]  # the child writes token 6 first
    assert cache.block_tables("c") == [[1, 3]] and cache.block_tables("p") == [[1, 2]]
    assert [b.ref_count for b in blocks[1:4]] == [2, 1, 1]
    assert cache.copy_on_write("p", 6) == []  # block 2 is the parent's alone now
    assert cache.copy_on_write("c", 8) == []  # a new block is never shared
    cache.check_integrity()
    cache.free("p")
    assert [b.ref_count for b in blocks[1:4]] == [1, 0, 1]
    cache.check_integrity()


def test_bytes_held_together_counts_a_forks_shared_blocks_once() -> None:
    cache = KVCacheManager([spec(), spec(window=4)], [9, 9])
    page = sum(s.page_nbytes for s in cache.specs)
    cache.allocate("p", 6)  # blocks 1, 2 in each group
    cache.fork("p", "c")
    assert cache.bytes_held_together(["p", "c"]) == 2 * page
    cache.copy_on_write("c", 6)  # the child's own copy of block 2
    assert cache.bytes_held_together(["p", "c", "gone"]) == 3 * page
    assert cache.bytes_held("p") + cache.bytes_held("c") == 4 * page
    cache.free("p")
    assert cache.bytes_held_together(["p", "c"]) == 2 * page


def test_truncate_returns_the_tail_and_never_writes_into_a_named_block() -> None:
    cache = KVCacheManager([spec()], [9])
    tokens = list(range(12))
    cache.allocate("p", 12)  # blocks 1, 2, 3, all named
    cache.cache_full_blocks("p", hashes_of(tokens))
    cache.truncate("p", 5)  # keep 1 and 2 (1 token of it); 3 released, named and free
    assert cache.block_tables("p") == [[1, 2]]
    blocks = cache.pools[0].blocks
    assert blocks[3].ref_count == 0 and list(cache.pools[0].free_queue)[-1] == 3
    cache.check_integrity()
    # Block 2 still holds tokens 4-7 under its name: the next write (token 5) goes to a copy.
    assert cache.copy_on_write("p", 5) == [(0, 2, 4)]
    assert cache.block_tables("p") == [[1, 4]] and blocks[4].block_hash is None
    assert blocks[2].ref_count == 0 and hit_of(cache, tokens[:8]).num_tokens == 8
    # Refilled, the block is named again (the name's owner, block 2, keeps it).
    cache.allocate("p", 8)
    cache.cache_full_blocks("p", hashes_of(tokens[:8]))
    assert blocks[4].block_hash is None and blocks[2].block_hash == hashes_of(tokens)[1]
    cache.truncate("p", 0)
    assert cache.block_tables("p") == [[]]
    cache.check_integrity()


def test_truncate_behind_a_window_is_refused_and_changes_nothing() -> None:
    cache = KVCacheManager([spec(), spec(window=4)], [9, 9])
    cache.allocate("w", 16)
    cache.remove_skipped("w", 16)  # the query at 16 reads 13-16: blocks 1-3 go
    assert cache.block_tables("w") == [[1, 2, 3, 4], [0, 0, 0, 4]]
    with pytest.raises(ValueError, match=r"table indices \[1\]"):
        cache.truncate("w", 8)
    assert cache.block_tables("w") == [[1, 2, 3, 4], [0, 0, 0, 4]]
    cache.truncate("w", 15)  # the query at 15 reads 12-15: still held
    assert cache.block_tables("w") == [[1, 2, 3, 4], [0, 0, 0, 4]]
    cache.fork("w", "x")
    cache.check_integrity()
