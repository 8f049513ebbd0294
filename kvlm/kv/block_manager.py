"""Block bookkeeping: which request owns which KV blocks. Integers only, never a tensor.

Invariants (checked by `check_integrity`):
- a block's ref_count equals the number of block tables that list it;
- ref_count 0 <=> the block is in the free queue (and in no block table);
- a block with a hash is full and immutable, and the prefix index maps that hash to it;
- free blocks with a hash stay findable until `_take_free_block` hands them out again (LRU).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class OutOfBlocksError(RuntimeError):
    """The pool cannot hold what was asked; the message gives the numbers."""


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and its tokens are computed


def hash_block(parent: bytes | None, token_ids: Sequence[int], cache_salt: str | None) -> bytes:
    """A full block's name: chained from its parent's, so equal hashes mean equal prefixes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update((cache_salt or "").encode())
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; O(1) pop, append and removal by id.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_index: dict[bytes, KVBlock] = {}
        self.block_tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[bytes]] = {}  # per request: hashes of its leading full blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(
        self, token_ids: Sequence[int], cache_salt: str | None = None
    ) -> list[KVBlock]:
        """The longest chain of cached full blocks that starts `token_ids`.

        Capped so at least the last token is left to compute: its logits start generation.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        found: list[KVBlock] = []
        parent = None
        for i in range(max_blocks):
            chunk = token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, chunk, cache_salt)
            block = self.prefix_index.get(parent)
            if block is None:
                break
            found.append(block)
        return found

    def allocate(self, request_id: str, num_tokens: int, cached: Sequence[KVBlock] = ()) -> None:
        """Give `request_id` blocks for `num_tokens` tokens, reusing `cached` as its first blocks.

        Raises OutOfBlocksError (changing nothing) if the free blocks do not suffice.
        """
        table = self.block_tables.get(request_id)
        if table is None and cached:
            assert all(b.block_hash is not None for b in cached), "cached blocks must be full"
        demand = self._free_blocks_demanded(request_id, num_tokens, cached)
        if demand > self.num_free_blocks:
            raise OutOfBlocksError(
                f"request {request_id} needs {demand} more blocks of "
                f"{self.block_size} tokens; {self.num_free_blocks} free of {self.num_blocks}"
            )
        num_new = self.blocks_needed(num_tokens) - len(table or cached)
        if table is None:
            table = self.block_tables[request_id] = []
            self.hashes[request_id] = []
            for block in cached:
                self._ref(block)
                table.append(block.block_id)
                self.hashes[request_id].append(block.block_hash)
        for _ in range(max(num_new, 0)):
            table.append(self._take_free_block().block_id)

    def can_allocate(
        self, request_id: str, num_tokens: int, cached: Sequence[KVBlock] = ()
    ) -> bool:
        return self._free_blocks_demanded(request_id, num_tokens, cached) <= self.num_free_blocks

    def _free_blocks_demanded(
        self, request_id: str, num_tokens: int, cached: Sequence[KVBlock]
    ) -> int:
        """Free-queue blocks `allocate` would take: new blocks plus revived cached ones."""
        table = self.block_tables.get(request_id)
        num_new = self.blocks_needed(num_tokens) - len(table or cached)
        # Reviving a cached free block takes it out of the free queue too.
        revived = sum(1 for b in cached if b.ref_count == 0) if table is None else 0
        return num_new + revived

    def cache_full_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
        cache_salt: str | None = None,
    ) -> None:  # fmt: skip
        """Name every block whose tokens are all computed, so later requests can reuse it."""
        if not self.enable_prefix_caching:
            return
        table, hashes = self.block_tables[request_id], self.hashes[request_id]
        num_full = num_computed_tokens // self.block_size
        for i in range(len(hashes), num_full):
            chunk = token_ids[i * self.block_size : (i + 1) * self.block_size]
            block_hash = hash_block(hashes[-1] if hashes else None, chunk, cache_salt)
            hashes.append(block_hash)
            block = self.blocks[table[i]]
            if block.block_hash is None and block_hash not in self.prefix_index:
                block.block_hash = block_hash
                self.prefix_index[block_hash] = block

    def free(self, request_id: str) -> None:
        """Release a request's blocks; tail blocks go to the free queue first (evicted first)."""
        table = self.block_tables.pop(request_id)
        self.hashes.pop(request_id)
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (only blocks no request holds can lose their hash)."""
        for block_hash, block in list(self.prefix_index.items()):
            if block.ref_count == 0:
                block.block_hash = None
                del self.prefix_index[block_hash]

    def _ref(self, block: KVBlock) -> None:
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def _take_free_block(self) -> KVBlock:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached prefix
            del self.prefix_index[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block

    def check_integrity(self) -> None:
        """Assert every invariant in the module docstring; raises AssertionError on a breach."""
        counts = [0] * self.num_blocks
        for table in self.block_tables.values():
            assert len(set(table)) == len(table), f"block listed twice in one table: {table}"
            for block_id in table:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count}, "
                f"held by {counts[block.block_id]} tables"
            )
            in_free = block.block_id in self.free_queue
            assert in_free == (block.ref_count == 0), (
                f"block {block.block_id}: ref_count {block.ref_count} but in_free_queue={in_free}"
            )
            if block.block_hash is not None:
                assert self.prefix_index.get(block.block_hash) is block, (
                    f"block {block.block_id} has a hash the prefix index does not map to it"
                )
        assert all(b.block_hash == h for h, b in self.prefix_index.items())
        for request_id, hashes in self.hashes.items():
            assert len(hashes) <= len(self.block_tables[request_id])
