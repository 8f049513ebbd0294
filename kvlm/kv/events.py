"""Changes to the cache's bookkeeping, recorded as they happen and read once per step.

A watcher (the server's live cache view) attaches a `KVEventLog` to a `KVCacheManager`; from
then on every pool appends the id of each block whose state may have changed (taken, held once
more, released, named, forgotten) and every table manager the id of each request whose block
table changed. Recording is one list append; with no log attached (`events is None`) nothing is
recorded. `drain()` hands the changes over and starts afresh, so a watcher reads the state of
the changed blocks only, never the whole pool.
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
        if any(pool.events is not None for pool in cache.pools):
            raise RuntimeError("this cache already has an event log attached")
        self.cache = cache
        self.blocks: list[list[int]] = [[] for _ in cache.pools]
        self.requests: list[str] = []
        for pool, blocks in zip(cache.pools, self.blocks, strict=True):
            pool.events = blocks
        for group in cache.groups:
            group.events = self.requests

    def drain(self) -> KVChanges:
        changes = KVChanges(
            [sorted(set(ids)) for ids in self.blocks], list(dict.fromkeys(self.requests))
        )
        for ids in self.blocks:
            ids.clear()
        self.requests.clear()
        return changes

    def detach(self) -> None:
        for pool in self.cache.pools:
            pool.events = None
        for group in self.cache.groups:
            group.events = None
