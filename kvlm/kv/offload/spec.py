"""`--kv-offload ram:SIZE,disk:DIR:SIZE,redis://HOST:PORT`: which tiers hold evicted blocks.

Each tier appears at most once; lookups always go RAM, then disk, then Redis, whatever the
order written. RAM and disk take a capacity (LRU beyond it); Redis's capacity and eviction are
the server's own (`maxmemory` with `maxmemory-policy allkeys-lru`), since several engines
share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kvlm.kv.offload.local import DiskTier, RAMTier
from kvlm.kv.offload.tier import Tier
from kvlm.kv.offload.tiered import TieredStore
from kvlm.sizes import parse_bytes

TIER_ORDER = ("ram", "disk", "redis")
EXAMPLE = "ram:2GiB,disk:/var/cache/kvlm:20GiB,redis://127.0.0.1:6379"


class OffloadSpecError(ValueError):
    """A --kv-offload value kvlm cannot read; the message shows the expected form."""


@dataclass(frozen=True)
class TierSpec:
    kind: str  # "ram" | "disk" | "redis"
    capacity: int | None = None  # bytes (ram, disk)
    path: Path | None = None  # disk
    url: str | None = None  # redis


def parse_offload(value: str) -> tuple[TierSpec, ...]:
    """The tiers named by `value`, in lookup order (RAM, disk, Redis)."""
    tiers: dict[str, TierSpec] = {}
    for item in (part.strip() for part in value.split(",")):
        kind = item.split(":", 1)[0].lower()
        if kind not in TIER_ORDER:
            raise OffloadSpecError(
                f"--kv-offload: unknown tier {item!r}; write tiers like {EXAMPLE}"
            )
        if kind in tiers:
            raise OffloadSpecError(f"--kv-offload names the {kind} tier twice")
        try:
            if kind == "ram":
                tier = TierSpec("ram", capacity=parse_bytes(item.split(":", 1)[1]))
            elif kind == "disk":
                _, rest = item.split(":", 1)
                path, size = rest.rsplit(":", 1)
                if not path:
                    raise OffloadSpecError("--kv-offload: the disk tier needs a directory")
                tier = TierSpec("disk", capacity=parse_bytes(size), path=Path(path).expanduser())
            else:
                url = urlsplit(item)
                if not url.hostname or url.port is None:
                    raise OffloadSpecError(
                        f"--kv-offload: {item!r} needs a host and a port (redis://HOST:PORT)"
                    )
                tier = TierSpec("redis", url=item)
        except OffloadSpecError:
            raise
        except (IndexError, ValueError) as e:  # a SizeError is a ValueError
            raise OffloadSpecError(
                f"--kv-offload: cannot read {item!r} ({e}); write tiers like {EXAMPLE}"
            ) from e
        if tier.capacity is not None and tier.capacity <= 0:
            raise OffloadSpecError(f"--kv-offload: the {kind} tier needs a positive size")
        tiers[kind] = tier
    return tuple(tiers[kind] for kind in TIER_ORDER if kind in tiers)


def make_tier(spec: TierSpec) -> Tier:
    if spec.kind == "ram":
        assert spec.capacity is not None
        return RAMTier(spec.capacity)
    if spec.kind == "disk":
        assert spec.path is not None and spec.capacity is not None
        return DiskTier(spec.path, spec.capacity)
    from kvlm.kv.offload.redis_tier import RedisTier  # loads the redis package

    assert spec.url is not None
    return RedisTier(spec.url)


def make_tiers(specs: Sequence[TierSpec]) -> TieredStore:
    return TieredStore([make_tier(s) for s in specs])
