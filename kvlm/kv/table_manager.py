"""Per layer group: which blocks of the group's pool each request holds, by that group's rules.

A full-attention group keeps every block of a sequence. A sliding-window group lets go of the
blocks that fell wholly behind its window (their table entries become the null block), except
the first `num_sinks` tokens' blocks, which attention sinks keep. Integers only.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvlm.kv.block_pool import NULL_BLOCK_ID, BlockPool, KVBlock
from kvlm.kv.spec import KVCacheSpec

HitBlocks = list[KVBlock | None]  # a prefix hit's blocks; None where the group needs none


class TableManager:
    """Full attention: a request's table lists one block per `block_size` tokens, in order."""

    def __init__(self, spec: KVCacheSpec, pool: BlockPool) -> None:
        self.spec = spec
        self.pool = pool
        self.block_size = spec.block_size
        self.tables: dict[str, list[int]] = {}
        self.num_named: dict[str, int] = {}  # leading table entries already offered to the index
        # Requests whose blocks a press compacted: their blocks no longer hold their text's
        # prefix, so none of them is ever named for prefix hits.
        self.compacted: set[str] = set()
        self.events: list[str] | None = None  # ids of requests whose table changed (kv/events.py)

    # --- prefix hits ----------------------------------------------------------------------

    def needed_for_hit(self, num_blocks: int) -> Sequence[int]:
        """Indices of the blocks a hit of `num_blocks` blocks must find cached."""
        return range(num_blocks)

    def longest_hit(self, block_hashes: Sequence[bytes], max_blocks: int) -> int:
        """The most leading blocks (at most `max_blocks`) this group can take from the cache."""
        for i in range(max_blocks):
            if self.pool.cached(block_hashes[i]) is None:
                return i
        return max_blocks

    def hit_blocks(self, block_hashes: Sequence[bytes], num_blocks: int) -> HitBlocks:
        blocks: HitBlocks = [None] * num_blocks
        for i in self.needed_for_hit(num_blocks):
            blocks[i] = self.pool.cached(block_hashes[i])
        return blocks

    # --- allocation -----------------------------------------------------------------------

    def blocks_demanded(self, request_id: str, num_tokens: int, hit: HitBlocks) -> int:
        """Free-queue blocks `allocate` would take: new ones plus cached ones it revives."""
        table = self.tables.get(request_id)
        num_new = -(-num_tokens // self.block_size) - len(table if table is not None else hit)
        revived = 0 if table is not None else sum(1 for b in hit if b and b.ref_count == 0)
        return max(num_new, 0) + revived

    def allocate(self, request_id: str, num_tokens: int, hit: HitBlocks) -> None:
        """Give the request blocks for `num_tokens` tokens, its first ones from `hit`."""
        table = self.tables.get(request_id)
        if table is None:
            table = self.tables[request_id] = []
            self.num_named[request_id] = len(hit)  # cached blocks carry their hashes already
            for block in hit:
                if block is not None:
                    self.pool.ref(block)
                table.append(NULL_BLOCK_ID if block is None else block.block_id)
        num_new = -(-num_tokens // self.block_size) - len(table)
        table.extend(block.block_id for block in self.pool.take(max(num_new, 0)))
        if self.events is not None and num_new > 0:  # a new table always takes a new block
            self.events.append(request_id)

    def remove_skipped(self, request_id: str, num_computed_tokens: int) -> None:
        """Let go of blocks no later query can read (none, under full attention)."""

    def name_full_blocks(self, request_id: str, block_hashes: Sequence[bytes]) -> None:
        """Offer each newly hashed block of the request to the prefix index."""
        if request_id in self.compacted:
            return
        table = self.tables[request_id]
        end = min(len(block_hashes), len(table))
        for i in range(self.num_named[request_id], end):
            if table[i] != NULL_BLOCK_ID:
                self.pool.cache(self.pool.blocks[table[i]], block_hashes[i])
        self.num_named[request_id] = max(self.num_named[request_id], end)

    def free(self, request_id: str) -> None:
        """Release a request's blocks; tail blocks join the free queue first (evicted first)."""
        table = self.tables.pop(request_id)
        self.num_named.pop(request_id)
        self.compacted.discard(request_id)
        held = [self.pool.blocks[i] for i in reversed(table) if i != NULL_BLOCK_ID]
        self.pool.release(held)
        if self.events is not None:
            self.events.append(request_id)

    # --- forks and rollbacks ---------------------------------------------------------------

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child's table lists the parent's blocks, each held once more (none copied)."""
        assert child_id not in self.tables, f"request {child_id} already holds blocks"
        table = self.tables[parent_id]
        for block_id in table:
            if block_id != NULL_BLOCK_ID:
                self.pool.ref(self.pool.blocks[block_id])
        self.tables[child_id] = list(table)
        self.num_named[child_id] = self.num_named[parent_id]
        if parent_id in self.compacted:
            self.compacted.add(child_id)
        if self.events is not None:
            self.events.append(child_id)

    def check_truncate(self, request_id: str, num_tokens: int) -> None:
        """ValueError if `truncate` cannot keep what a query at `num_tokens` reads (a window
        group that let go of it); full attention keeps everything."""

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Keep the blocks of the first `num_tokens` tokens; the rest are released, tail
        first. A kept partial last block keeps its name, if it has one, until the request
        writes into it (`unshare_partial` gives it a copy first); it is named again only once
        full."""
        table = self.tables[request_id]
        keep = -(-num_tokens // self.block_size)
        dropped = [self.pool.blocks[i] for i in reversed(table[keep:]) if i != NULL_BLOCK_ID]
        del table[keep:]
        self.num_named[request_id] = min(self.num_named[request_id], num_tokens // self.block_size)
        self.pool.release(dropped)
        if self.events is not None and dropped:
            self.events.append(request_id)

    def blocks_to_compact(self, request_id: str, num_tokens: int) -> tuple[int, int]:
        """(blocks `compact` takes from the free queue, blocks it returns there): the kept
        range's blocks that another holder or the prefix index may read are replaced."""
        table, keep = self.tables[request_id], -(-num_tokens // self.block_size)
        blocks = [self.pool.blocks[i] for i in table]
        replaced = [b for b in blocks[:keep] if b.ref_count > 1 or b.block_hash is not None]
        freed = [b for b in blocks[keep:] + replaced if b.ref_count == 1]
        return len(replaced), len(freed)

    def compact(self, request_id: str, num_tokens: int) -> None:
        """Keep table entries for the first `num_tokens` cache rows only (a press moves the
        kept K/V there): the blocks past them are released, tail first, and each kept block
        that another holder or the prefix index may read (shared, or named) is released and
        replaced by a fresh one, so the rewrite touches only the request's own blocks and a
        named block keeps the plain prefix it names. The request is never named again."""
        table, keep = self.tables[request_id], -(-num_tokens // self.block_size)
        self.pool.release(self.pool.blocks[i] for i in reversed(table[keep:]))
        del table[keep:]
        replaced = [
            j
            for j, block_id in enumerate(table)
            if self.pool.blocks[block_id].ref_count > 1
            or self.pool.blocks[block_id].block_hash is not None
        ]
        self.pool.release(self.pool.blocks[table[j]] for j in replaced)
        for j, block in zip(replaced, self.pool.take(len(replaced)), strict=True):
            table[j] = block.block_id
        self.compacted.add(request_id)
        if self.events is not None:
            self.events.append(request_id)

    def shared_partial(self, request_id: str, num_computed_tokens: int) -> int | None:
        """The table index of the partial block the next token is written into, if another
        holder or the prefix index may read it (so it must be copied first); else None."""
        index = num_computed_tokens // self.block_size
        table = self.tables[request_id]
        if num_computed_tokens % self.block_size == 0 or index >= len(table):
            return None
        block = self.pool.blocks[table[index]]
        return index if block.ref_count > 1 or block.block_hash is not None else None

    def unshare_partial(self, request_id: str, index: int) -> tuple[int, int]:
        """Give the request its own block at `index`: (source, destination) to copy."""
        table = self.tables[request_id]
        source = self.pool.blocks[table[index]]
        [copy] = self.pool.take(1)
        table[index] = copy.block_id
        self.pool.release([source])
        if self.events is not None:
            self.events.append(request_id)
        return source.block_id, copy.block_id

    def num_held(self, request_id: str) -> int:
        return sum(1 for i in self.tables.get(request_id, ()) if i != NULL_BLOCK_ID)

    def table_refs(self) -> list[int]:
        refs = [0] * self.pool.num_blocks
        for table in self.tables.values():
            held = [i for i in table if i != NULL_BLOCK_ID]
            assert len(set(held)) == len(held), f"block listed twice in one table: {table}"
            for block_id in held:
                refs[block_id] += 1
        return refs


class SlidingWindowManager(TableManager):
    """Keeps the sink blocks and the blocks a query at the sequence's end can still reach."""

    def __init__(self, spec: KVCacheSpec, pool: BlockPool) -> None:
        super().__init__(spec, pool)
        assert spec.window is not None
        self.window = spec.window
        self.num_sink_blocks = spec.num_sink_blocks
        self.num_skipped: dict[str, int] = {}  # table entries below this index are handled

    def _first_needed_block(self, num_computed_tokens: int) -> int:
        """The oldest block the next query (at position `num_computed_tokens`) reads."""
        return max(num_computed_tokens - self.window + 1, 0) // self.block_size

    def needed_for_hit(self, num_blocks: int) -> list[int]:
        first = self._first_needed_block(num_blocks * self.block_size)
        return [*range(min(self.num_sink_blocks, first)), *range(first, num_blocks)]

    def longest_hit(self, block_hashes: Sequence[bytes], max_blocks: int) -> int:
        for num_blocks in range(max_blocks, 0, -1):  # the newest blocks are the likeliest misses
            needed = reversed(self.needed_for_hit(num_blocks))
            if all(self.pool.cached(block_hashes[i]) for i in needed):
                return num_blocks
        return 0

    def allocate(self, request_id: str, num_tokens: int, hit: HitBlocks) -> None:
        if request_id not in self.tables:
            self.num_skipped[request_id] = 0
        super().allocate(request_id, num_tokens, hit)

    def remove_skipped(self, request_id: str, num_computed_tokens: int) -> None:
        table = self.tables.get(request_id)
        if table is None:
            return
        first = min(self._first_needed_block(num_computed_tokens), len(table))
        start = max(self.num_skipped[request_id], self.num_sink_blocks)
        skipped = []
        for i in range(start, first):
            if table[i] != NULL_BLOCK_ID:
                skipped.append(self.pool.blocks[table[i]])
                table[i] = NULL_BLOCK_ID
        self.pool.release(skipped)
        self.num_skipped[request_id] = max(self.num_skipped[request_id], first)
        if self.events is not None and skipped:
            self.events.append(request_id)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self.num_skipped.pop(request_id)

    def fork(self, parent_id: str, child_id: str) -> None:
        super().fork(parent_id, child_id)
        self.num_skipped[child_id] = self.num_skipped[parent_id]

    def check_truncate(self, request_id: str, num_tokens: int) -> None:
        """ValueError if the window let go of a block a query at `num_tokens` reads."""
        table = self.tables[request_id]
        first = self._first_needed_block(num_tokens)
        keep = min(-(-num_tokens // self.block_size), len(table))
        needed = [*range(min(self.num_sink_blocks, first)), *range(first, keep)]
        released = [i for i in needed if table[i] == NULL_BLOCK_ID]
        if released:
            raise ValueError(
                f"request {request_id} cannot roll back to {num_tokens} tokens: its window "
                f"already released the blocks at table indices {released}"
            )

    def truncate(self, request_id: str, num_tokens: int) -> None:
        super().truncate(request_id, num_tokens)
        keep = -(-num_tokens // self.block_size)
        self.num_skipped[request_id] = min(self.num_skipped[request_id], keep)


def make_table_manager(spec: KVCacheSpec, pool: BlockPool) -> TableManager:
    """The manager a spec calls for: the group's rules follow from its window."""
    if spec.window is None:
        return TableManager(spec, pool)
    return SlidingWindowManager(spec, pool)
