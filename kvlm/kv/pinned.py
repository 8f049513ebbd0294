"""Runs of blocks the pools themselves hold, and the virtual prefixes built on them.

A pinned block never returns to the free queue, so no pool pressure evicts it, and it keeps its
name in the prefix index, so every request whose block hashes start with the run's gets it as an
ordinary prefix hit. Integers only: whoever fills the blocks owns the tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlm.kv.cache_manager import BlockIds


@dataclass(frozen=True)
class PinnedRun:
    """Blocks pinned for the positions of a run (`KVCacheManager.allocate_pinned`)."""

    blocks: BlockIds  # per layer group, the ids of the blocks pinned there, in position order

    def block_ids(self, group: int) -> list[int]:
        return list(self.blocks[group])


@dataclass(frozen=True)
class VirtualPrefix:
    """The first positions of every sequence that carries it, with K/V given, not computed
    (a prefix-tuning adapter's virtual tokens): its blocks are pinned and named, so requests
    find its full blocks as a prefix hit; the last partial block is copied into each request's
    own block, which the request's first tokens then fill.

    A request's `token_ids` start with `token_ids` (placeholders, never embedded: they are
    always counted as computed); its block hashes start with `block_hashes` and carry
    `hash_key` as an extra key, so a cache salt of the request's own changes only the blocks
    after them, and no client salt can name them.
    """

    name: str
    token_ids: tuple[int, ...]  # one placeholder id per virtual position
    hash_key: str  # names this prefix's K/V (an extra key): the blocks after it differ by it too
    block_hashes: tuple[bytes, ...]  # of its full blocks
    run: PinnedRun  # ceil(P / block_size) blocks per group, the full ones named

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def tail_copies(self, block_tables: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
        """(group, source, destination) block copies that put the partial last block into a
        request's table (`block_tables[g]`: the request's block ids in group g); none when
        the prefix fills whole blocks."""
        index = len(self.block_hashes)  # the partial block follows the full ones
        if len(self.run.blocks[0]) == index:
            return []
        return [
            (g, blocks[index], block_tables[g][index]) for g, blocks in enumerate(self.run.blocks)
        ]
