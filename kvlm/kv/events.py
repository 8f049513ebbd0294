"""Changes to the cache's bookkeeping, recorded as they happen and read once per step.

A watcher (the server's live cache view) makes a `KVEventLog` for a `KVCacheManager`, which
attaches it (`KVCacheManager.attach_event_log`); from then on every pool appends the id of
each block whose state may have changed (taken, held once more, released, named, forgotten)
and every table manager the id of each request whose block table changed. Recording is one
list append; with no log attached (`events is None`) nothing is recorded. `drain()` hands
the changes over and starts afresh, so a watcher reads the state of the changed blocks only,
never the whole pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from kvlm.kv.block_pool import KVBlock
from kvlm.kv.cache_manager import KVCacheManager


class BlockState(IntEnum):
    """What a block is doing, as the cache view draws it."""

    FREE = 0  # in the free queue, holding nothing anyone can find
    USED = 1  # listed in one request's table
    SHARED = 2  # listed in several requests' tables (a prefix hit)
    CACHED = 3  # in the free queue, but named: a later request with its prefix reuses it
    PINNED = 4  # held by the pool itself (a registered prefix); never evicted


def block_state(block: KVBlock) -> BlockState:
    if block.pinned:
        return BlockState.PINNED
    if block.ref_count == 0:
        return BlockState.FREE if block.block_hash is None else BlockState.CACHED
    return BlockState.USED if block.ref_count == 1 else BlockState.SHARED


@dataclass(frozen=True)
class KVChanges:
    block_ids: list[list[int]]  # per group, blocks whose state may have changed, ascending
    request_ids: list[str]  # requests whose block table changed in some group, in first order


class KVEventLog:
    """Collects a cache manager's changes between two `drain()` calls (one engine step)."""

    def __init__(self, cache: KVCacheManager) -> None:
        """Attached to `cache` at once; RuntimeError if it has a log already."""
        self.cache = cache
        self.blocks: list[list[int]] = [[] for _ in cache.pools]  # appended to by the pools
        self.requests: list[str] = []  # appended to by the table managers
        cache.attach_event_log(self)

    def drain(self) -> KVChanges:
        changes = KVChanges(
            [sorted(set(ids)) for ids in self.blocks], list(dict.fromkeys(self.requests))
        )
        for ids in self.blocks:
            ids.clear()
        self.requests.clear()
        return changes

    def detach(self) -> None:
        assert self.cache.event_log is self, "this log is not the one attached"
        self.cache.detach_event_log()
