"""Whole blocks in and out of the cache, by prefix: what session files and offload tiers use.

Exporting reads the blocks a prefix hit would use (every group's, sinks and window included)
straight from the stores, one gather per group. Importing hands the blocks to the cache
manager (`KVCacheManager.import_blocks`), which picks free blocks (the least recently used
ones) for those it lacks, has this module write them in one scatter per group, and names them
exactly as if a request had just computed and freed them: the next request with that prefix
gets an ordinary prefix hit. This module only moves bytes; the manager keeps the books.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlm.kv.cache_manager import KVCacheManager, PrefixHit
from kvlm.kv.store import KVStore


@dataclass
class GroupPages:
    """One layer group's share of a prefix: the blocks it needs for a hit, as pages."""

    indices: list[int]  # block indices into the prefix, ascending (a window group skips some)
    pages: torch.Tensor  # [len(indices), page_nbytes] uint8 (kv/block_codec.py's layout)


@dataclass
class PrefixBlocks:
    """The K/V of the first `num_blocks` blocks of a token sequence, per layer group."""

    num_blocks: int
    groups: list[GroupPages]


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
        """A copy of the longest cached run of `block_hashes` that every group can serve, one
        gather per group (queued on the store's device: reading it out may happen on another
        thread)."""
        hit = self._hit(block_hashes)
        groups = []
        for store, blocks in zip(self.stores, hit.blocks, strict=True):
            indices = [i for i, b in enumerate(blocks) if b is not None]
            ids = [b.block_id for b in blocks if b is not None]
            groups.append(GroupPages(indices, store.read_pages(ids)))
        return PrefixBlocks(hit.num_tokens // self.block_size, groups)

    def import_prefix(self, block_hashes: Sequence[bytes], prefix: PrefixBlocks) -> int:
        """Write `prefix` into free blocks, named by `block_hashes`; blocks already cached are
        kept. Returns how many leading tokens a prefix lookup now finds (fewer than the prefix
        holds when a pool had too few free blocks)."""

        def fill(group: int, positions: list[int], block_ids: list[int]) -> None:
            pages = prefix.groups[group].pages
            if len(positions) < len(pages):
                pages = pages[torch.tensor(positions, dtype=torch.long)]
            self.stores[group].write_pages(block_ids, pages)

        hashes = block_hashes[: prefix.num_blocks]
        self.cache.import_blocks(hashes, [g.indices for g in prefix.groups], fill)
        return self._hit(hashes).num_tokens
