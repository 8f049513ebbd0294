"""A press's door (`KVCacheManager.compact`) and copy (`KVStore.compact`): the table shrinks to
the kept rows' blocks, freed blocks return at once, shared or named kept blocks are swapped
for the request's own (the old ones keep their K/V and names), compacted blocks are never
named, table edits are reported; every step checked with `check_integrity()`."""

from __future__ import annotations

import pytest
import torch

from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.block_pool import OutOfBlocksError
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.store import KVStore

BLOCK_SIZE = 4


def spec(kv_format: str = "float32", window: int | None = None) -> KVCacheSpec:
    return KVCacheSpec((0, 1), 2, 8, BLOCK_SIZE, kv_format, window)


def hashes_of(tokens: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, len(tokens), BLOCK_SIZE, None)
    return hashes


def test_compact_frees_the_tail_at_once_and_reports_the_edit() -> None:
    cache = KVCacheManager([spec(), spec()], [12, 12], enable_prefix_caching=False)
    cache.track_table_edits()
    cache.allocate("r", 18)  # 5 blocks per group
    cache.allocate("other", 4)
    cache.pop_table_edits()
    assert cache.num_used_blocks() == [6, 6]
    cache.compact("r", 9)  # 3 blocks
    assert cache.block_tables("r") == [[1, 2, 3], [1, 2, 3]]
    assert cache.num_used_blocks() == [4, 4]
    assert list(cache.pools[0].free_queue)[-2:] == [5, 4]  # the tail first
    assert cache.pop_table_edits() == {"r": 0}
    cache.check_integrity()
    cache.allocate("r", 13)  # decode grows the compacted table again
    assert cache.block_tables("r")[0][:3] == [1, 2, 3] and len(cache.block_tables("r")[0]) == 4
    cache.check_integrity()


def test_named_and_shared_kept_blocks_are_swapped_and_never_named_again() -> None:
    cache = KVCacheManager([spec()], [16])
    tokens = list(range(16))
    cache.allocate("first", 16)  # blocks 1-4, named
    cache.cache_full_blocks("first", hashes_of(tokens))
    cache.free("first")
    hit = cache.find_cached_prefix(hashes_of(tokens + [99]), 17)
    assert hit.num_tokens == 16
    cache.allocate("plain", 17, hit)  # holds 1-4 and its own 5
    hit = cache.find_cached_prefix(hashes_of(tokens + [98]), 17)
    cache.allocate("pressed", 17, hit)  # shares 1-4, takes 6
    assert cache.block_tables("pressed") == [[1, 2, 3, 4, 6]]
    cache.compact("pressed", 6)  # keeps 2 blocks: both shared, so swapped
    table = cache.block_tables("pressed")[0]
    assert len(table) == 2 and not {1, 2, 3, 4} & set(table)
    blocks = cache.pools[0].blocks
    assert [blocks[i].ref_count for i in (1, 2, 3, 4)] == [1, 1, 1, 1]  # "plain" only
    assert all(blocks[i].block_hash is not None for i in (1, 2, 3, 4))  # names kept
    cache.check_integrity()
    cache.allocate("pressed", 16)  # four full blocks again, under the text's hashes
    cache.cache_full_blocks("pressed", hashes_of(list(range(100, 116))))
    assert all(blocks[i].block_hash is None for i in cache.block_tables("pressed")[0])
    cache.free("plain")
    assert cache.find_cached_prefix(hashes_of(tokens + [1]), 17).num_tokens == 16
    cache.check_integrity()


def test_compact_refuses_with_nothing_changed_when_swaps_do_not_fit() -> None:
    cache = KVCacheManager([spec()], [6], enable_prefix_caching=False)
    cache.allocate("a", 8)  # blocks 1, 2
    cache.fork("a", "b")
    cache.allocate("c", 12)  # blocks 3, 4, 5: the pool is full
    with pytest.raises(OutOfBlocksError, match="swaps 2 shared blocks"):
        cache.compact("b", 8)
    assert cache.block_tables("b") == [[1, 2]]
    cache.check_integrity()


def test_compact_leaves_window_groups_and_later_counts_go_per_group() -> None:
    """Gemma 3's layout (engine/press.py): the full group shrinks to the kept rows' blocks,
    the window group keeps its table (it lets go by text position itself); from then on the
    request's allocations and copy-on-write checks name each group's own count."""
    cache = KVCacheManager([spec(), spec(window=8)], [12, 12], enable_prefix_caching=False)
    cache.track_table_edits()
    cache.allocate("r", 18)  # 5 blocks per group
    cache.remove_skipped("r", 18)  # a query at 18 reads 11-18 of the window: blocks 2-4
    assert cache.block_tables("r") == [[1, 2, 3, 4, 5], [0, 0, 3, 4, 5]]
    cache.pop_table_edits()
    cache.compact("r", 9)  # 3 blocks, in the full group only
    assert cache.block_tables("r") == [[1, 2, 3], [0, 0, 3, 4, 5]]
    assert cache.num_used_blocks() == [3, 3]
    assert cache.pop_table_edits() == {"r": 0}
    assert cache.can_allocate("r", [13, 22]) and not cache.can_allocate("r", [13, 64])
    cache.allocate("r", [13, 22])  # 9 + 4 cache rows, 18 + 4 text tokens
    assert cache.block_tables("r") == [[1, 2, 3, 6], [0, 0, 3, 4, 5, 6]]
    cache.fork("r", "child")
    copies = cache.copy_on_write("r", [13, 22])  # each group's partial last block, shared
    assert [(group, source) for group, source, _ in copies] == [(0, 6), (1, 6)]
    cache.check_integrity()
    with pytest.raises(ValueError, match="every layer group has a window"):
        KVCacheManager([spec(window=8)], [6]).compact("x", 4)


@pytest.mark.parametrize("kv_format", ["float32", "int8", "int4"])
def test_store_compact_moves_each_heads_kept_rows_as_stored(kv_format: str) -> None:
    group = spec(kv_format)
    store = KVStore(group, 8, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    n = 10
    table = [5, 2, 7]  # 10 tokens in three blocks, deliberately out of order
    rows = torch.tensor(
        [table[i // BLOCK_SIZE] * store.rows_per_block + i % BLOCK_SIZE for i in range(n)]
    )
    for layer in group.layer_ids:
        store.write(layer, rows, torch.randn(n, 2, 8), torch.randn(n, 2, 8))
    before = {layer: store.gather(layer, rows) for layer in group.layer_ids}
    kept = torch.tensor([[[0, 3, 4, 9], [1, 2, 8, 9]], [[5, 6, 7, 8], [0, 1, 2, 3]]])
    destination = torch.tensor([5 * store.rows_per_block + j for j in range(4)])  # block 5
    store.compact(rows, kept, destination)
    for local, layer in enumerate(group.layer_ids):
        k_after, v_after = store.gather(layer, destination)
        for head in range(2):
            index = kept[local, head]
            assert torch.equal(k_after[:, head], before[layer][0][index, head])
            assert torch.equal(v_after[:, head], before[layer][1][index, head])
