"""The cache's bookkeeping across layer groups: one pool and one table manager per group.

This is the one door to KV state: nothing outside `kv/` changes a pool or a table. Requests
are named by id; their block hashes (computed once, on the request) are passed in. A prefix
hit counts only where every group finds what it needs (a window group only the blocks inside
its window and its sinks), and an allocation happens in every group or in none. Pins (blocks
the cache holds for itself) are counted, so prefixes sharing blocks each hold them. Whoever
copies blocks out before their K/V is overwritten (offload) listens for evictions here, and a
watcher's event log is attached here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvlm.kv.block_pool import NULL_BLOCK_ID, BlockPool, KVBlock, OutOfBlocksError
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.table_manager import HitBlocks, make_table_manager

# (group, block id, block hash) of a cached block about to be reused for other tokens.
EvictListener = Callable[[int, int, bytes], None]
# (group, positions into the given indices, block ids to write them into): see import_blocks.
FillBlocks = Callable[[int, list[int], list[int]], None]
BlockIds = tuple[tuple[int, ...], ...]  # per layer group, block ids
# Tokens (or cache rows) of one request: the same in every layer group, or one per group (a
# press compacts only the groups without a window, `KVCacheManager.compact`).
GroupTokens = int | Sequence[int]


class ChangeLog(Protocol):
    """Where the pools and table managers note changes (kv/events.py's `KVEventLog`; named
    here by what is used of it, so this module does not import events.py, which imports it)."""

    blocks: list[list[int]]  # per group, ids of blocks whose state may have changed
    requests: list[str]  # ids of requests whose block table changed


@dataclass
class PrefixHit:
    num_tokens: int  # leading tokens whose K/V every group can reuse
    blocks: list[HitBlocks]  # per group, one entry per hit block (None: not needed there)


class KVCacheManager:
    def __init__(
        self,
        specs: Sequence[KVCacheSpec],
        num_blocks: Sequence[int],
        enable_prefix_caching: bool = True,
    ) -> None:
        """`num_blocks[g]` blocks (the null block included) for group `g`."""
        assert len({s.block_size for s in specs}) == 1, "all groups share one block size"
        self.specs = tuple(specs)
        self.block_size = specs[0].block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [
            BlockPool(n, enable_prefix_caching, functools.partial(self._evicted, g))
            for g, n in enumerate(num_blocks)
        ]
        self.groups = [make_table_manager(s, p) for s, p in zip(specs, self.pools, strict=True)]
        self._evict_listeners: list[EvictListener] = []
        self.event_log: ChangeLog | None = None
        # Per request, the first table index that may have changed other than by appending
        # (a free, fork, rollback or copy-on-write) since `pop_table_edits`; None: not tracked.
        self._table_edits: dict[str, int] | None = None

    # --- prefix hits ----------------------------------------------------------------------

    def find_cached_prefix(self, block_hashes: Sequence[bytes], num_tokens: int) -> PrefixHit:
        """The longest prefix of a `num_tokens`-token sequence every group can reuse.

        Capped so at least the last token is left to compute: its logits start generation.
        """
        num_blocks = min(len(block_hashes), (num_tokens - 1) // self.block_size)
        if not self.enable_prefix_caching:
            num_blocks = 0
        while True:  # a group may only shorten the hit, so this settles within len(groups)
            shortest = min(g.longest_hit(block_hashes, num_blocks) for g in self.groups)
            if shortest == num_blocks:
                break
            num_blocks = shortest
        blocks = [g.hit_blocks(block_hashes, num_blocks) for g in self.groups]
        return PrefixHit(num_blocks * self.block_size, blocks)

    def is_cached(self, group: int, block_hash: bytes) -> bool:
        return self.pools[group].cached(block_hash) is not None

    # --- allocation -----------------------------------------------------------------------

    def can_allocate(
        self, request_id: str, num_tokens: GroupTokens, hit: PrefixHit | None = None
    ) -> bool:
        lengths = self._per_group(num_tokens)
        return all(
            g.blocks_demanded(request_id, n, self._hit(hit, i)) <= p.num_free_blocks
            for i, (g, p, n) in enumerate(zip(self.groups, self.pools, lengths, strict=True))
        )

    def allocate(
        self, request_id: str, num_tokens: GroupTokens, hit: PrefixHit | None = None
    ) -> None:
        """Blocks for `num_tokens` tokens in every group (per group once a press compacted
        some), or (OutOfBlocksError) none at all."""
        lengths = self._per_group(num_tokens)
        for i, (group, pool, n) in enumerate(zip(self.groups, self.pools, lengths, strict=True)):
            demand = group.blocks_demanded(request_id, n, self._hit(hit, i))
            if demand > pool.num_free_blocks:
                raise OutOfBlocksError(
                    f"request {request_id} needs {demand} more blocks of {self.block_size} "
                    f"tokens in layer group {i}; {pool.num_free_blocks} free of "
                    f"{pool.num_usable_blocks}"
                )
        for i, (group, n) in enumerate(zip(self.groups, lengths, strict=True)):
            group.allocate(request_id, n, self._hit(hit, i))

    def remove_skipped(self, request_id: str, num_computed_tokens: int) -> None:
        """Return the blocks that fell behind every window to the pools."""
        for group in self.groups:
            group.remove_skipped(request_id, num_computed_tokens)

    def cache_full_blocks(self, request_id: str, block_hashes: Sequence[bytes]) -> None:
        """Name the request's full, computed blocks (one hash each) for later prefix hits."""
        for group in self.groups:
            group.name_full_blocks(request_id, block_hashes)

    def free(self, request_id: str) -> None:
        for group in self.groups:
            group.free(request_id)
        self._edited(request_id, 0)

    def fork(self, parent_request_id: str, child_request_id: str) -> None:
        """The child holds every block of the parent by reference (n > 1, beams): no block
        is copied until one of them writes into a shared partial block (`copy_on_write`)."""
        for group in self.groups:
            group.fork(parent_request_id, child_request_id)
        self._edited(child_request_id, 0)

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Roll the request back to its first `num_tokens` tokens (rejected draft tokens):
        the blocks past them are released; a partial last block is copied before the next
        write if anyone else may read it (`copy_on_write`). ValueError, with nothing changed,
        if a window already let go of blocks the shorter sequence needs."""
        if num_tokens < 0:
            raise ValueError(f"cannot truncate request {request_id} to {num_tokens} tokens")
        for group in self.groups:  # every group checks before any group changes
            group.check_truncate(request_id, num_tokens)
        for group in self.groups:
            group.truncate(request_id, num_tokens)
        self._edited(request_id, num_tokens // self.block_size)

    @property
    def compactable_groups(self) -> list[int]:
        """The groups a press compacts: those without a window (a window group's blocks go
        by text position, and it lets go of old ones itself)."""
        return [g for g, spec in enumerate(self.specs) if spec.window is None]

    def compact(self, request_id: str, num_tokens: int) -> None:
        """After a press: the request keeps blocks for its first `num_tokens` cache rows only,
        in every group without a window (`compactable_groups`; the caller then moves the kept
        K/V into them, `KVStore.compact`, reading the rows of the tables it held before); window
        groups keep their tables. Blocks past them go back to the pools; a kept block another
        request or the prefix index may read is swapped for a fresh one (the old one keeps its
        K/V and its name), and the request's blocks there are never named for prefix hits
        again. In every such group or (OutOfBlocksError) none: a swap needs a free block."""
        if num_tokens < 1:
            raise ValueError(f"cannot compact request {request_id} to {num_tokens} tokens")
        compacted = self.compactable_groups
        if not compacted:
            raise ValueError("every layer group has a window: none can compact")
        for i in compacted:
            taken, freed = self.groups[i].blocks_to_compact(request_id, num_tokens)
            if taken > self.pools[i].num_free_blocks + freed:
                raise OutOfBlocksError(
                    f"compacting request {request_id} swaps {taken} shared blocks in layer "
                    f"group {i} for its own; {self.pools[i].num_free_blocks + freed} would be free"
                )
        for i in compacted:
            self.groups[i].compact(request_id, num_tokens)
        self._edited(request_id, 0)

    def copy_on_write(
        self, request_id: str, num_computed_tokens: GroupTokens
    ) -> list[tuple[int, int, int]]:
        """Before the request writes its cache row `num_computed_tokens` (per group once a
        press compacted some): in every group where that row's partial block is shared (a
        fork) or named (a rollback into a cached block), the request gets a fresh block.
        Returns the (group, source, destination) block copies the caller makes before the
        write; in every group or (OutOfBlocksError) none."""
        rows = self._per_group(num_computed_tokens)
        shared = [g.shared_partial(request_id, n) for g, n in zip(self.groups, rows, strict=True)]
        for i, (index, pool) in enumerate(zip(shared, self.pools, strict=True)):
            if index is not None and pool.num_free_blocks == 0:
                raise OutOfBlocksError(
                    f"request {request_id} needs a block in layer group {i} to copy a shared "
                    "partial block into; none is free"
                )
        copies = [
            (i, *group.unshare_partial(request_id, index))
            for i, (group, index) in enumerate(zip(self.groups, shared, strict=True))
            if index is not None
        ]
        if copies:
            self._edited(request_id, min(i for i in shared if i is not None))
        return copies

    def holds(self, request_id: str) -> bool:
        return request_id in self.groups[0].tables

    def block_tables(self, request_id: str) -> list[list[int]]:
        """Per group, the request's block ids (the null block where a window let go)."""
        return [g.tables[request_id] for g in self.groups]

    def track_table_edits(self) -> None:
        """From now on note, per request, where its block tables change other than by
        appending blocks or by a window nulling its oldest entries, for `pop_table_edits`."""
        if self._table_edits is None:
            self._table_edits = {}

    def pop_table_edits(self) -> dict[str, int]:
        """Requests whose tables changed since the last call other than by appending (a
        window's nulled entries aside), each with the first table index that may differ (0
        after a free or fork: the whole table); the log starts empty again."""
        if self._table_edits is None:
            raise RuntimeError("pop_table_edits needs track_table_edits() first")
        edits, self._table_edits = self._table_edits, {}
        return edits

    def _edited(self, request_id: str, index: int) -> None:
        if self._table_edits is not None:
            self._table_edits[request_id] = min(index, self._table_edits.get(request_id, index))

    def bytes_held(self, request_id: str) -> int:
        """KV bytes the request's tables hold now, all groups, scales included."""
        return sum(g.num_held(request_id) * g.spec.page_nbytes for g in self.groups)

    def bytes_held_together(self, request_ids: Sequence[str]) -> int:
        """KV bytes the requests' tables hold between them, all groups, scales included: a
        block several of them share (a fork) counts once; an id holding nothing adds nothing."""
        total = 0
        for group in self.groups:
            held = {i for r in request_ids for i in group.tables.get(r, ())}
            held.discard(NULL_BLOCK_ID)
            total += len(held) * group.spec.page_nbytes
        return total

    def num_used_blocks(self) -> list[int]:
        return [p.num_usable_blocks - p.num_free_blocks for p in self.pools]

    def bytes_used(self) -> list[int]:
        """Per group, bytes of the blocks held by some request or pin."""
        used = self.num_used_blocks()
        return [n * s.page_nbytes for n, s in zip(used, self.specs, strict=True)]

    def bytes_total(self) -> list[int]:
        """Per group, bytes of all its usable blocks (the null block left out)."""
        pools = zip(self.pools, self.specs, strict=True)
        return [p.num_usable_blocks * s.page_nbytes for p, s in pools]

    @property
    def usage(self) -> float:
        """Fraction of all usable KV bytes held."""
        return sum(self.bytes_used()) / sum(self.bytes_total())

    def reset_prefix_cache(self) -> None:
        for pool in self.pools:
            pool.reset_prefix_cache()

    # --- pins -----------------------------------------------------------------------------

    def pin(self, hit: PrefixHit) -> BlockIds:
        """Pin once more every block of `hit` (none where a group needs none); returns, per
        group, the pinned ids in order, which `unpin` takes to undo exactly this."""
        pinned = []
        for pool, blocks in zip(self.pools, hit.blocks, strict=True):
            held = [b for b in blocks if b is not None]
            for block in held:
                pool.pin(block)
            pinned.append(tuple(b.block_id for b in held))
        return tuple(pinned)

    def unpin(self, block_ids: BlockIds) -> None:
        """Take one pin off each block, tail first: unheld, a prefix's head is evicted last."""
        for pool, ids in zip(self.pools, block_ids, strict=True):
            for block_id in reversed(ids):
                pool.unpin(pool.blocks[block_id])

    def allocate_pinned(self, num_tokens: int, block_hashes: Sequence[bytes]) -> BlockIds:
        """Fresh pinned blocks for `num_tokens` positions in every group, the full ones named
        by `block_hashes` (one each), the last partial one unnamed; per group, their ids. The
        caller writes their K/V."""
        num_blocks = -(-num_tokens // self.block_size)
        assert len(block_hashes) == num_tokens // self.block_size, "one hash per full block"
        short = [p.num_free_blocks for p in self.pools if p.num_free_blocks < num_blocks]
        if short:
            raise OutOfBlocksError(
                f"{num_tokens} pinned positions need {num_blocks} blocks of {self.block_size} "
                f"tokens in every layer group; only {min(short)} free"
            )
        pinned = []
        for pool in self.pools:
            taken = pool.take(num_blocks)
            for block, block_hash in zip(taken, block_hashes, strict=False):
                pool.cache(block, block_hash)
                assert block.block_hash == block_hash, "its hash was already cached elsewhere"
            for block in taken:
                pool.pin(block)
            pool.release(taken)  # the pin alone holds them now
            pinned.append(tuple(b.block_id for b in taken))
        return tuple(pinned)

    # --- blocks from outside (sessions, offload tiers) ------------------------------------

    def import_blocks(
        self, block_hashes: Sequence[bytes], indices: Sequence[Sequence[int]], fill: FillBlocks
    ) -> None:
        """Put K/V computed elsewhere into the prefix cache as computed, named, free blocks.

        `block_hashes` name a prefix's blocks; `indices[g]`: the block indices whose K/V the
        caller has for group g. The prefix's blocks a group has cached already are kept (held
        while the others are taken, so none is evicted to make room); the others go into free
        blocks, the first ones first, as many as are free: `fill(g, positions, block_ids)`
        writes the K/V of `indices[g][p]` into the matching block id for each p of
        `positions`, then they are named. All join the free queue later blocks first, so a
        prefix's head is evicted last, exactly as if a request had computed and freed them.
        """
        for g, (pool, wanted) in enumerate(zip(self.pools, indices, strict=True)):
            held: list[tuple[int, KVBlock]] = []  # out of the free queue: `take` keeps them
            for i, block_hash in enumerate(block_hashes):
                cached = pool.cached(block_hash)
                if cached is not None:
                    pool.ref(cached)
                    held.append((i, cached))
            have = {i for i, _ in held}
            missing = [p for p, i in enumerate(wanted) if i not in have][: pool.num_free_blocks]
            taken = pool.take(len(missing))
            try:
                if taken:
                    fill(g, missing, [b.block_id for b in taken])
            except BaseException:
                pool.release([*taken, *(b for _, b in held)])
                raise
            for p, block in zip(missing, taken, strict=True):
                pool.cache(block, block_hashes[wanted[p]])
                held.append((wanted[p], block))
            pool.release(block for _, block in sorted(held, key=lambda x: -x[0]))

    # --- watchers -------------------------------------------------------------------------

    def add_evict_listener(self, listener: EvictListener) -> None:
        """`listener(group, block_id, block_hash)` hears of each cached block about to be
        reused for other tokens: on the engine thread, before its K/V is overwritten (it may
        queue a copy). Every listener hears every eviction, in the order they were added."""
        self._evict_listeners.append(listener)

    def remove_evict_listener(self, listener: EvictListener) -> None:
        self._evict_listeners.remove(listener)

    def _evicted(self, group: int, block: KVBlock) -> None:
        assert block.block_hash is not None
        for listener in self._evict_listeners:
            listener(group, block.block_id, block.block_hash)

    def attach_event_log(self, log: ChangeLog) -> None:
        """From now on every pool records changed block ids in `log.blocks[g]`, every group
        the ids of requests whose table changed in `log.requests` (kv/events.py)."""
        if self.event_log is not None:
            raise RuntimeError("this cache already has an event log attached")
        self.event_log = log
        for pool, blocks in zip(self.pools, log.blocks, strict=True):
            pool.events = blocks
        for group in self.groups:
            group.events = log.requests

    def detach_event_log(self) -> None:
        self.event_log = None
        for pool in self.pools:
            pool.events = None
        for group in self.groups:
            group.events = None

    def check_integrity(self) -> None:
        """Assert every pool's invariants and that all groups know the same requests."""
        ids = set(self.groups[0].tables)
        for group, pool in zip(self.groups, self.pools, strict=True):
            assert set(group.tables) == ids, "layer groups disagree on which requests they hold"
            pool.check_integrity(group.table_refs())

    def _per_group(self, num_tokens: GroupTokens) -> Sequence[int]:
        if isinstance(num_tokens, int):
            return [num_tokens] * len(self.groups)
        assert len(num_tokens) == len(self.groups), "one token count per layer group"
        return num_tokens

    @staticmethod
    def _hit(hit: PrefixHit | None, group: int) -> HitBlocks:
        return [] if hit is None else hit.blocks[group]
