"""The cache's bookkeeping across layer groups: one pool and one table manager per group.

Requests are named by id; their block hashes (computed once, on the request) are passed in.
A prefix hit counts only where every group finds what it needs (a window group only the blocks
inside its window and its sinks), and an allocation happens in every group or in none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvlm.kv.block_pool import BlockPool, KVBlock, OutOfBlocksError
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.table_manager import HitBlocks, make_table_manager


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
        on_evict: Callable[[int, KVBlock], None] | None = None,
    ) -> None:
        """`num_blocks[g]` blocks (the null block included) for group `g`; `on_evict(g, block)`
        hears of each cached block about to be reused for other tokens."""
        assert len({s.block_size for s in specs}) == 1, "all groups share one block size"
        self.specs = tuple(specs)
        self.block_size = specs[0].block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [
            BlockPool(n, enable_prefix_caching, _group_hook(on_evict, g))
            for g, n in enumerate(num_blocks)
        ]
        self.groups = [make_table_manager(s, p) for s, p in zip(specs, self.pools, strict=True)]

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

    # --- allocation -----------------------------------------------------------------------

    def can_allocate(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        return all(
            g.blocks_demanded(request_id, num_tokens, self._hit(hit, i)) <= p.num_free_blocks
            for i, (g, p) in enumerate(zip(self.groups, self.pools, strict=True))
        )

    def allocate(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> None:
        """Blocks for `num_tokens` tokens in every group, or (OutOfBlocksError) none at all."""
        for i, (group, pool) in enumerate(zip(self.groups, self.pools, strict=True)):
            demand = group.blocks_demanded(request_id, num_tokens, self._hit(hit, i))
            if demand > pool.num_free_blocks:
                raise OutOfBlocksError(
                    f"request {request_id} needs {demand} more blocks of {self.block_size} "
                    f"tokens in layer group {i}; {pool.num_free_blocks} free of "
                    f"{pool.num_usable_blocks}"
                )
        for i, group in enumerate(self.groups):
            group.allocate(request_id, num_tokens, self._hit(hit, i))

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

    def holds(self, request_id: str) -> bool:
        return request_id in self.groups[0].tables

    def block_tables(self, request_id: str) -> list[list[int]]:
        """Per group, the request's block ids (the null block where a window let go)."""
        return [g.tables[request_id] for g in self.groups]

    def bytes_held(self, request_id: str) -> int:
        """KV bytes the request's tables hold now, all groups, scales included."""
        return sum(g.num_held(request_id) * g.spec.page_nbytes for g in self.groups)

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

    def check_integrity(self) -> None:
        """Assert every pool's invariants and that all groups know the same requests."""
        ids = set(self.groups[0].tables)
        for group, pool in zip(self.groups, self.pools, strict=True):
            assert set(group.tables) == ids, "layer groups disagree on which requests they hold"
            pool.check_integrity(group.table_refs())

    @staticmethod
    def _hit(hit: PrefixHit | None, group: int) -> HitBlocks:
        return [] if hit is None else hit.blocks[group]


def _group_hook(
    on_evict: Callable[[int, KVBlock], None] | None, group: int
) -> Callable[[KVBlock], None] | None:
    if on_evict is None:
        return None
    return lambda block: on_evict(group, block)
