"""`--kv-offload`: tiers in lookup order, and a message naming the item for each bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvlm.kv.offload.local import DiskTier, RAMTier
from kvlm.kv.offload.spec import OffloadSpecError, TierSpec, make_tiers, parse_offload


def test_parse_offload_orders_tiers_ram_disk_redis(tmp_path: Path) -> None:
    tiers = parse_offload(f"redis://127.0.0.1:6379,disk:{tmp_path}:1GiB,ram:512MiB")
    assert tiers == (
        TierSpec("ram", capacity=512 << 20),
        TierSpec("disk", capacity=1 << 30, path=tmp_path),
        TierSpec("redis", url="redis://127.0.0.1:6379"),
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ram", "cannot read 'ram'"),
        ("ram:lots", "cannot read 'ram:lots'"),
        ("ram:0", "needs a positive size"),
        ("disk:/tmp/x", "cannot read 'disk:/tmp/x'"),
        ("disk::1GiB", "needs a directory"),
        ("redis://localhost", "needs a host and a port"),
        ("ssd:/x:1G", "unknown tier 'ssd:/x:1G'"),
        ("ram:1G,ram:2G", "names the ram tier twice"),
    ],
)
def test_parse_offload_errors_name_the_item(value: str, message: str) -> None:
    with pytest.raises(OffloadSpecError, match=message):
        parse_offload(value)


def test_make_tiers_builds_them_in_lookup_order(tmp_path: Path) -> None:
    store = make_tiers(parse_offload(f"disk:{tmp_path}:1MiB,ram:1MiB"))
    assert [type(t) for t in store.tiers] == [RAMTier, DiskTier]
