"""The tiers together: every evicted block is written to each tier (write-through), and a lookup
asks RAM, then disk, then Redis; what a slower tier had is copied into RAM once the caller
has checked it (`promote`).

Writing through rather than demoting RAM's victims to disk and disk's to Redis means Redis holds
every block any replica evicted, which is what lets another replica find it; each tier still
keeps only what fits, least recently used out first.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvlm.kv.offload.local import RAMTier
from kvlm.kv.offload.tier import Tier, TierSnapshot


class TieredStore:
    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = list(tiers)
        self._ram = next((t for t in self.tiers if isinstance(t, RAMTier)), None)

    def may_have(self, key: bytes) -> bool:
        return any(t.may_have(key) for t in self.tiers)

    def put(self, key: bytes, blob: bytes) -> None:
        for tier in self.tiers:
            tier.put(key, blob)

    def get_many(self, keys: Sequence[bytes]) -> list[tuple[bytes, Tier] | None]:
        """Per key, its blob and the tier that had it (the fastest that did), or None."""
        found: list[tuple[bytes, Tier] | None] = [None] * len(keys)
        for tier in self.tiers:
            wanted = [i for i, f in enumerate(found) if f is None]
            if not wanted:
                break
            for i, blob in zip(wanted, tier.get_many([keys[i] for i in wanted]), strict=True):
                if blob is not None:
                    found[i] = (blob, tier)
        return found

    def promote(self, key: bytes, blob: bytes, tier: Tier) -> None:
        """Copy a blob a slower tier had (and the caller checked) into RAM."""
        if self._ram is not None and tier is not self._ram:
            self._ram.put(key, blob)

    def snapshot(self) -> tuple[TierSnapshot, ...]:
        return tuple(t.snapshot() for t in self.tiers)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
