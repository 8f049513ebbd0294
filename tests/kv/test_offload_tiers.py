"""Offload tiers without a model: LRU capacity per tier, sealed blobs, and a Redis tier that
fails quietly when the server is gone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvlm.kv.block_codec import CorruptBlockError, decode_pages, encode_pages, seal, unseal
from kvlm.kv.offload.local import DiskTier, RAMTier
from kvlm.kv.offload.redis_tier import RedisTier
from kvlm.kv.offload.tiered import TieredStore
from kvlm.kv.spec import KVCacheSpec


def test_ram_tier_evicts_least_recently_used() -> None:
    tier = RAMTier(capacity=30)
    for key in (b"a", b"b", b"c"):
        tier.put(key, b"x" * 10)
    assert tier.get_many([b"a"]) == [b"x" * 10]  # a is now the most recent
    tier.put(b"d", b"y" * 10)  # over capacity: b (least recent) goes
    assert tier.get_many([b"a", b"b", b"c", b"d"]) == [b"x" * 10, None, b"x" * 10, b"y" * 10]
    assert tier.bytes_held() == 30
    snap = tier.snapshot()
    assert (snap.hits, snap.misses, snap.stores) == (4, 1, 4)


def test_disk_tier_keeps_lru_within_capacity_and_across_restarts(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity=25)
    tier.put(b"\x01", b"a" * 10)
    tier.put(b"\x02", b"b" * 10)
    tier.put(b"\x03", b"c" * 10)  # 30 > 25: the oldest file is deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["02.kv", "03.kv"]
    again = DiskTier(tmp_path, capacity=25)  # a restarted engine finds the files
    assert again.get_many([b"\x01", b"\x02", b"\x03"]) == [None, b"b" * 10, b"c" * 10]


def test_tiered_store_promotes_a_checked_disk_hit_into_ram(tmp_path: Path) -> None:
    ram, disk = RAMTier(capacity=100), DiskTier(tmp_path, capacity=100)
    disk.put(b"k", b"blob")
    store = TieredStore([ram, disk])
    [(blob, tier)] = store.get_many([b"k"])
    assert (blob, tier) == (b"blob", disk)
    assert ram.get_many([b"k"]) == [None]  # not before the caller checked it
    store.promote(b"k", blob, tier)
    assert ram.get_many([b"k"]) == [b"blob"]


def test_sealed_block_refuses_damage_and_other_keys() -> None:
    spec = KVCacheSpec((0, 1), num_kv_heads=2, head_dim=32, block_size=4, kv_format="int8")
    page = torch.randint(0, 256, (1, spec.page_nbytes), dtype=torch.uint8)
    blob = seal(b"key", bytes(encode_pages(page)))
    back = decode_pages(spec, unseal(b"key", blob), 1)
    assert torch.equal(back, page)
    damaged = bytearray(blob)
    damaged[40] ^= 1
    with pytest.raises(CorruptBlockError, match="digest mismatch"):
        unseal(b"key", bytes(damaged))
    with pytest.raises(CorruptBlockError, match="digest mismatch"):
        unseal(b"other key", blob)
    with pytest.raises(CorruptBlockError, match="got 10"):
        decode_pages(spec, b"x" * 10, 1)


def test_redis_tier_down_counts_failures_and_answers_absent() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tier = RedisTier(f"redis://127.0.0.1:{port}", timeout=0.2, retry_after=60)
    tier.put(b"k", b"v")
    assert tier.get_many([b"k"]) == [None]  # quiet after the failure: no second wait
    assert tier.snapshot().failures == 1
    assert not tier.may_have(b"k")


def test_sealed_block_of_the_old_naming_is_refused_by_version() -> None:
    """Format 1 sealed a block as digest + bytes under names that could collide: never read."""
    import hashlib

    body = b"\1" * 64
    old_blob = hashlib.blake2b(b"key" + body, digest_size=16).digest() + body
    refused = "block naming version 1, this kvlm reads version 2"
    with pytest.raises(CorruptBlockError, match=refused):
        unseal(b"key", old_blob)
    assert unseal(b"key", seal(b"key", body)) == body
