"""Whole blocks in and out of the cache, by prefix: what session files and offload tiers use.

Exporting reads the blocks a prefix hit would use (every group's, sinks and window included)
straight from the stores. Importing writes blocks into free blocks of the pools and names them
with their hashes, exactly as if a request had just computed and freed them: the next request
with that prefix gets an ordinary prefix hit. The pools decide which blocks are taken (the
least recently used ones); this module only moves bytes and names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlm.kv.block_codec import BlockData
from kvlm.kv.block_pool import KVBlock
from kvlm.kv.cache_manager import KVCacheManager, PrefixHit
from kvlm.kv.store import KVStore


@dataclass
class PrefixBlocks:
    """The K/V of the first `num_blocks` blocks of a token sequence."""

    num_blocks: int
    # [group][block index]: None where the group needs no block for a hit (behind its window)
    blocks: list[list[BlockData | None]]


class BlockTransfer:
    def __init__(self, cache: KVCacheManager, stores: Sequence[KVStore]) -> None:
        self.cache = cache
        self.stores = list(stores)
        self.block_size = cache.block_size

    def _hit(self, block_hashes: Sequence[bytes]) -> PrefixHit:
        """The longest cached run of `block_hashes` every group can serve (all of them may be
        cached: no block is held back for a last token to compute)."""
        return self.cache.find_cached_prefix(block_hashes, len(block_hashes) * self.block_size + 1)

    def num_cached_blocks(self, block_hashes: Sequence[bytes]) -> int:
        return self._hit(block_hashes).num_tokens // self.block_size

    def export_prefix(self, block_hashes: Sequence[bytes]) -> PrefixBlocks:
        """Copies of the longest cached run of `block_hashes` that every group can serve."""
        hit = self._hit(block_hashes)
        blocks = [
            [None if b is None else store.read_block(b.block_id) for b in group_blocks]
            for store, group_blocks in zip(self.stores, hit.blocks, strict=True)
        ]
        return PrefixBlocks(hit.num_tokens // self.block_size, blocks)

    def import_prefix(self, block_hashes: Sequence[bytes], prefix: PrefixBlocks) -> int:
        """Write `prefix` into free blocks, named by `block_hashes`; blocks already cached are
        kept. Returns how many leading tokens a prefix lookup now finds (fewer than the prefix
        holds when a pool had too few free blocks)."""
        for pool, store, blocks in zip(self.cache.pools, self.stores, prefix.blocks, strict=True):
            held: list[tuple[int, KVBlock]] = []  # out of the free queue while filling the group
            missing = []
            for i, data in enumerate(blocks):
                cached = pool.cached(block_hashes[i])
                if cached is not None:
                    pool.ref(cached)
                    held.append((i, cached))
                elif data is not None:
                    missing.append((i, data))
            missing = missing[: pool.num_free_blocks]
            for block, (i, data) in zip(pool.take(len(missing)), missing, strict=True):
                store.write_block(block.block_id, data)
                pool.cache(block, block_hashes[i])
                held.append((i, block))
            # Later blocks first into the free queue, so a prefix's head is evicted last.
            pool.release(block for _, block in sorted(held, key=lambda x: -x[0]))
        return self._hit(block_hashes[: prefix.num_blocks]).num_tokens
