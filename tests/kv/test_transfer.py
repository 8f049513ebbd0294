"""Blocks out of the stores and back, without a model, on every device present: bytes survive a
session-style export/import and an offload-tier round trip exactly, in float and int8 formats,
and come back as ordinary cached blocks."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from kvlm.engine.offload import OffloadConnector
from kvlm.kv.block_codec import decode_pages, encode_pages
from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.fingerprint import CacheIdentity
from kvlm.kv.offload.local import RAMTier
from kvlm.kv.offload.tiered import TieredStore
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.store import KVStore
from kvlm.kv.transfer import BlockTransfer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BLOCK_SIZE = 4
NUM_BLOCKS = 9  # the null block + 8
TOKENS = list(range(100, 122))  # 22 tokens: 5 whole blocks


def make_cache(kv_format: str, device: str) -> tuple[KVCacheManager, list[KVStore]]:
    spec = KVCacheSpec(
        (0, 1), num_kv_heads=2, head_dim=64, block_size=BLOCK_SIZE, kv_format=kv_format
    )
    cache = KVCacheManager((spec,), [NUM_BLOCKS])
    return cache, [KVStore(spec, NUM_BLOCKS, torch.float32, torch.device(device))]


def hashes_of(tokens: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, len(tokens), BLOCK_SIZE, None)
    return hashes


def compute(cache: KVCacheManager, stores: list[KVStore], device: str) -> None:
    """What a request does: blocks for TOKENS, random K/V written, full blocks named, freed."""
    cache.allocate("r", len(TOKENS))
    [table] = cache.block_tables("r")
    store = stores[0]
    positions = torch.arange(len(TOKENS))
    rows = torch.tensor(table)[positions // BLOCK_SIZE] * store.rows_per_block
    rows = (rows + positions % BLOCK_SIZE).to(device)
    for layer in (0, 1):
        k, v = torch.randn(2, len(TOKENS), 2, 64, device=device)
        store.write(layer, rows, k, v)
    cache.cache_full_blocks("r", hashes_of(TOKENS))
    cache.free("r")


def evict_everything(cache: KVCacheManager) -> None:
    """A request as long as the pool takes every free block, cached ones included."""
    cache.allocate("filler", cache.pools[0].num_free_blocks * BLOCK_SIZE)
    cache.free("filler")


def prefix_kv(cache: KVCacheManager, stores: list[KVStore]) -> list[torch.Tensor]:
    """K and V of every layer for the cached prefix's tokens, as attention would read them."""
    hashes = hashes_of(TOKENS)
    hit = cache.find_cached_prefix(hashes, len(TOKENS))
    store = stores[0]
    rows = torch.cat(
        [b.block_id * store.rows_per_block + torch.arange(BLOCK_SIZE) for b in hit.blocks[0]]
    ).to(store.data.device)
    return [t.cpu() for layer in (0, 1) for t in store.gather(layer, rows)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_format", ["float32", "int8"])
def test_export_then_import_into_another_cache_is_exact(kv_format: str, device: str) -> None:
    cache, stores = make_cache(kv_format, device)
    compute(cache, stores, device)
    prefix = BlockTransfer(cache, stores).export_prefix(hashes_of(TOKENS))
    assert prefix.num_blocks == len(TOKENS) // BLOCK_SIZE
    spec = stores[0].spec
    # Through bytes, as a session file holds them.
    for group in prefix.groups:
        group.pages = decode_pages(spec, bytearray(encode_pages(group.pages)), len(group.indices))
    other_cache, other_stores = make_cache(kv_format, device)
    restored = BlockTransfer(other_cache, other_stores).import_prefix(hashes_of(TOKENS), prefix)
    assert restored == prefix.num_blocks * BLOCK_SIZE
    for a, b in zip(prefix_kv(cache, stores), prefix_kv(other_cache, other_stores), strict=True):
        assert torch.equal(a, b)
    other_cache.check_integrity()
    assert other_cache.num_used_blocks() == [0]  # restored blocks are cached and free


@pytest.mark.parametrize("device", DEVICES)
def test_evicted_blocks_come_back_through_a_ram_tier_exactly(device: str) -> None:
    cache, stores = make_cache("int8", device)
    transfer = BlockTransfer(cache, stores)
    identity = CacheIdentity("model", "tokenizer", (stores[0].spec,))
    connector = OffloadConnector(TieredStore([RAMTier(1 << 30)]), identity, transfer)
    try:
        compute(cache, stores, device)
        before = prefix_kv(cache, stores)
        evict_everything(cache)
        assert connector.flush(timeout=30)
        assert cache.find_cached_prefix(hashes_of(TOKENS), len(TOKENS)).num_tokens == 0
        request = SimpleNamespace(request_id="again", token_ids=TOKENS)
        assert connector.start_load(request, hashes_of(TOKENS))  # type: ignore[arg-type]
        connector.wait_for_load(timeout=30)
        assert connector.finished_loads() == ["again"]
        hit = cache.find_cached_prefix(hashes_of(TOKENS), len(TOKENS))
        assert hit.num_tokens == (len(TOKENS) - 1) // BLOCK_SIZE * BLOCK_SIZE
        for a, b in zip(before, prefix_kv(cache, stores), strict=True):
            assert torch.equal(a, b)
        cache.check_integrity()
    finally:
        connector.close()


def test_evictions_past_the_write_backlog_are_dropped_not_waited_for() -> None:
    cache, stores = make_cache("float32", "cpu")
    ram = RAMTier(1 << 30)
    gate = threading.Event()
    put = ram._put

    def held_put(key: bytes, blob: bytes) -> bool:
        gate.wait(30)
        return put(key, blob)

    ram._put = held_put  # type: ignore[method-assign]
    identity = CacheIdentity("model", "tokenizer", (stores[0].spec,))
    connector = OffloadConnector(
        TieredStore([ram]), identity, BlockTransfer(cache, stores), max_pending_writes=2
    )
    try:
        compute(cache, stores, "cpu")
        evict_everything(cache)  # 5 evictions while writes are held
        assert connector.num_dropped_writes == 3
        gate.set()
        assert connector.flush(timeout=30)
        assert ram.snapshot().stores == 2
    finally:
        gate.set()
        connector.close()
