"""Block ids of one layer group's memory: reference counts, an LRU free queue, the prefix index.

Integers only, never a tensor. Block 0 is the null block: never handed out, it stands in block
tables for positions a window has let go of.

Invariants (checked by `check_integrity`, given how many tables hold each block):
- a block's ref_count equals the tables that list it plus its pins (each pin is one hold);
- ref_count 0 <=> the block is in the free queue;
- a block with a hash is full and immutable, and the prefix index maps that hash to it;
- a free block keeps its hash (stays findable) until `take` hands it out again, oldest first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

NULL_BLOCK_ID = 0


class OutOfBlocksError(RuntimeError):
    """The pool cannot hold what was asked; the message gives the numbers."""


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and its tokens are computed
    num_pins: int = 0  # holds the pool keeps for itself (registered prefixes, adapters)

    @property
    def pinned(self) -> bool:
        return self.num_pins > 0


class BlockPool:
    """One group's blocks. Only `KVCacheManager` calls the methods that change them."""

    def __init__(
        self,
        num_blocks: int,
        enable_caching: bool = True,
        on_evict: Callable[[KVBlock], None] | None = None,
    ) -> None:
        """`on_evict(block)` hears of each cached block just before it loses its hash."""
        if num_blocks < 2:
            raise ValueError(f"a pool needs the null block plus at least one, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.on_evict = on_evict
        self.events: list[int] | None = None  # ids of changed blocks, while a log is attached
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; O(1) pop, append and removal by id.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.prefix_index: dict[bytes, KVBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by a table or a pin."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def cached(self, block_hash: bytes) -> KVBlock | None:
        return self.prefix_index.get(block_hash) if self.enable_caching else None

    def take(self, count: int) -> list[KVBlock]:
        """`count` free blocks, oldest first, each with ref_count 1 and no hash."""
        if count > self.num_free_blocks:
            raise OutOfBlocksError(f"asked for {count} blocks; {self.num_free_blocks} free")
        taken = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict its cached prefix
                if self.on_evict is not None:
                    self.on_evict(block)
                del self.prefix_index[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            taken.append(block)
        if self.events is not None:
            self.events.extend(block.block_id for block in taken)
        return taken

    def ref(self, block: KVBlock) -> None:
        """One more holder; a free (cached) block comes out of the free queue."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1
        if self.events is not None:
            self.events.append(block.block_id)

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """One holder fewer for each; blocks left unheld join the free queue in this order."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None
            if self.events is not None:
                self.events.append(block.block_id)

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Name a full, computed block so later requests with the same prefix find it.

        A block named already must be named the same (its tokens cannot change); a name some
        other block holds stays with that one (two requests computed the same prefix)."""
        if block.block_hash is not None:
            assert block.block_hash == block_hash, (
                f"block {block.block_id} is named {block.block_hash.hex()}; "
                f"renaming it {block_hash.hex()} would serve its K/V for other tokens"
            )
            return
        if self.enable_caching and block_hash not in self.prefix_index:
            block.block_hash = block_hash
            self.prefix_index[block_hash] = block
            if self.events is not None:
                self.events.append(block.block_id)

    def pin(self, block: KVBlock) -> None:
        """One more hold for the pool itself (e.g. a registered prefix): while any pin holds a
        block it is never evicted. Pins count: two prefixes sharing a block pin it twice."""
        block.num_pins += 1
        self.ref(block)

    def unpin(self, block: KVBlock) -> None:
        """One pin fewer; the block returns to the free queue when nothing else holds it."""
        assert block.num_pins > 0, f"block {block.block_id} is not pinned"
        block.num_pins -= 1
        self.release([block])

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (only blocks nobody holds can lose their hash)."""
        for block_hash, block in list(self.prefix_index.items()):
            if block.ref_count == 0:
                block.block_hash = None
                del self.prefix_index[block_hash]
                if self.events is not None:
                    self.events.append(block.block_id)

    def check_integrity(self, table_refs: Sequence[int]) -> None:
        """Assert the module's invariants; `table_refs[i]` counts the tables listing block i."""
        for block in self.blocks[1:]:
            expected = table_refs[block.block_id] + block.num_pins
            assert block.ref_count == expected, (
                f"block {block.block_id}: ref_count {block.ref_count}, held {expected} times"
            )
            in_free = block.block_id in self.free_queue
            assert in_free == (block.ref_count == 0), (
                f"block {block.block_id}: ref_count {block.ref_count} but in_free_queue={in_free}"
            )
            if block.block_hash is not None:
                assert self.prefix_index.get(block.block_hash) is block, (
                    f"block {block.block_id} has a hash the prefix index does not map to it"
                )
        assert NULL_BLOCK_ID not in self.free_queue and table_refs[NULL_BLOCK_ID] == 0
        assert all(b.block_hash == h for h, b in self.prefix_index.items())
