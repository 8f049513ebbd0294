"""The two tiers on this machine: host RAM and a disk directory, each LRU within a capacity."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from kvlm.kv.offload.tier import Tier

logger = logging.getLogger(__name__)


class _LRU:
    """Sizes by key, least recently used first; evicts past a capacity in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sizes: OrderedDict[bytes, int] = OrderedDict()
        self.total = 0

    def touch(self, key: bytes) -> bool:
        if key in self.sizes:
            self.sizes.move_to_end(key)
            return True
        return False

    def add(self, key: bytes, size: int) -> list[bytes]:
        """Record `key`; returns the keys to drop so the total fits the capacity again."""
        self.sizes[key] = size
        self.total += size
        dropped = []
        while self.total > self.capacity and self.sizes:
            old, old_size = self.sizes.popitem(last=False)
            self.total -= old_size
            dropped.append(old)
        return dropped

    def remove(self, key: bytes) -> None:
        self.total -= self.sizes.pop(key, 0)


class RAMTier(Tier):
    name = "ram"

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self._lru = _LRU(capacity)
        self._blobs: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def may_have(self, key: bytes) -> bool:
        return key in self._blobs

    def _get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            return [self._blobs[k] if self._lru.touch(k) else None for k in keys]

    def _put(self, key: bytes, blob: bytes) -> bool:
        with self._lock:
            if self._lru.touch(key):
                return False
            self._blobs[key] = blob
            for old in self._lru.add(key, len(blob)):
                del self._blobs[old]
            return key in self._blobs  # a blob over the whole capacity is not kept

    def discard(self, key: bytes) -> None:
        with self._lock:
            self._lru.remove(key)
            self._blobs.pop(key, None)

    def bytes_held(self) -> int:
        return self._lru.total


class DiskTier(Tier):
    """One file per block under `directory` (named by the key), found again after a restart;
    files are written to a temporary name and renamed, so a crash never leaves half a blob."""

    name = "disk"

    def __init__(self, directory: Path, capacity: int) -> None:
        super().__init__()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lru = _LRU(capacity)
        self._lock = threading.Lock()
        old = sorted(directory.glob("*.kv"), key=lambda p: p.stat().st_mtime)
        for path in old:  # oldest first, so the LRU order survives the restart
            try:
                key = bytes.fromhex(path.stem)
            except ValueError:  # not a file this tier wrote
                continue
            self._drop(self._lru.add(key, path.stat().st_size))

    def _path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}.kv"

    def may_have(self, key: bytes) -> bool:
        return key in self._lru.sizes

    def _get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            with self._lock:
                known = self._lru.touch(key)
            blob = None
            if known:
                try:
                    blob = self._path(key).read_bytes()
                except OSError as e:
                    logger.warning("disk tier: cannot read %s: %s", self._path(key), e)
                    self.stats.add(failures=1)
                    with self._lock:
                        self._lru.remove(key)
            out.append(blob)
        return out

    def _put(self, key: bytes, blob: bytes) -> bool:
        with self._lock:
            if self._lru.touch(key):
                return False
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("disk tier: cannot write %s: %s", path, e)
            self.stats.add(failures=1)
            return False
        with self._lock:
            self._drop(self._lru.add(key, len(blob)))
            return key in self._lru.sizes

    def discard(self, key: bytes) -> None:
        with self._lock:
            self._lru.remove(key)
            self._drop([key])

    def _drop(self, keys: list[bytes]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def bytes_held(self) -> int:
        return self._lru.total
