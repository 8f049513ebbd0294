"""What every offload tier offers, and the counters it keeps.

A tier maps keys (a block's offload key, `CacheIdentity.block_key`) to sealed blobs
(`block_codec.seal`) and never reads inside them. Tiers are called from the offload threads,
never from the engine's step, so each guards its own state with a lock. A tier that fails
(an I/O error, Redis down) counts the failure and answers as if the block were absent: the
engine then recomputes, it never waits on a broken tier.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TierSnapshot:
    """Counters of one tier since start (blocks, bytes, seconds)."""

    name: str
    hits: int = 0  # blocks found when looked up
    misses: int = 0  # blocks looked up and not found (or not asked for: the tier is down)
    stores: int = 0  # blocks written
    failures: int = 0  # operations that raised (I/O error, timeout, corrupt blob)
    bytes_stored: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0  # time spent in lookups
    bytes_held: int | None = None  # what the tier holds now (None: not known, e.g. Redis)


class TierStats:
    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._counts = {f: 0 for f in ("hits", "misses", "stores", "failures")}
        self._counts |= {"bytes_stored": 0, "bytes_loaded": 0}
        self._load_seconds = 0.0

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self._counts[name] += value

    def add_load_time(self, seconds: float) -> None:
        with self._lock:
            self._load_seconds += seconds

    def snapshot(self, bytes_held: int | None) -> TierSnapshot:
        with self._lock:
            return TierSnapshot(
                self.name, **self._counts, load_seconds=self._load_seconds, bytes_held=bytes_held
            )


class Tier(ABC):
    name: str

    def __init__(self) -> None:
        self.stats = TierStats(self.name)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The blobs stored under `keys` (None where absent); counts hits, misses, time."""
        start = time.perf_counter()
        blobs = self._get_many(keys)
        found = [b for b in blobs if b is not None]
        self.stats.add(
            hits=len(found), misses=len(keys) - len(found), bytes_loaded=sum(map(len, found))
        )
        self.stats.add_load_time(time.perf_counter() - start)
        return blobs

    def put(self, key: bytes, blob: bytes) -> None:
        """Store `blob` under `key` (kept as is when the key is there already)."""
        if self._put(key, blob):
            self.stats.add(stores=1, bytes_stored=len(blob))

    def snapshot(self) -> TierSnapshot:
        return self.stats.snapshot(self.bytes_held())

    @abstractmethod
    def may_have(self, key: bytes) -> bool:
        """Cheap, without I/O: False only when the tier surely lacks `key`."""

    @abstractmethod
    def _get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    @abstractmethod
    def _put(self, key: bytes, blob: bytes) -> bool:
        """Store; False when nothing was written (already there, or a failure counted)."""

    @abstractmethod
    def discard(self, key: bytes) -> None:
        """Drop `key` (a damaged blob), so the block can be stored again."""

    def bytes_held(self) -> int | None:
        return None

    def close(self) -> None:  # noqa: B027 (most tiers hold nothing to let go of)
        """Let go of connections and files."""
