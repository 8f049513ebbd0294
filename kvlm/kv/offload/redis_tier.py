"""The shared tier: blocks in a Redis server that several engines (replicas) read and write.

Keys are the blocks' offload keys under a `kvlm:` prefix, values sealed blobs, so any engine
with the same model and cache layout can use a block another engine stored, and no other can.
Redis decides what to keep (`maxmemory`, `allkeys-lru`). Every call has a short timeout; after
a failure the tier stays quiet for `retry_after` seconds (lookups answer "absent", stores are
skipped) instead of making each request wait on a server that is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from kvlm.kv.offload.tier import Tier

logger = logging.getLogger(__name__)
KEY_PREFIX = b"kvlm:"
DEFAULT_TIMEOUT_S = 0.5
RETRY_AFTER_S = 2.0
_MGET_CHUNK = 32


class RedisTier(Tier):
    name = "redis"

    def __init__(
        self, url: str, timeout: float = DEFAULT_TIMEOUT_S, retry_after: float = RETRY_AFTER_S
    ) -> None:
        import redis  # the tier is optional: the package loads only when it is used

        super().__init__()
        self.url = url
        self.retry_after = retry_after
        self._errors = (redis.RedisError, OSError)
        # Query-string options in the URL (e.g. ?socket_timeout=2) win over these defaults.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._quiet_until = 0.0
        self._lock = threading.Lock()

    def _up(self) -> bool:
        return time.monotonic() >= self._quiet_until

    def may_have(self, key: bytes) -> bool:
        return self._up()  # unknown without asking: worth asking while the server is up

    def _failed(self, what: str, error: Exception) -> None:
        self.stats.add(failures=1)
        with self._lock:
            first = time.monotonic() >= self._quiet_until
            self._quiet_until = time.monotonic() + self.retry_after
        if first:
            logger.warning(
                "redis tier %s: %s failed (%s); recomputing instead, retrying in %.0f s",
                self.url,
                what,
                error,
                self.retry_after,
            )

    def _get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not self._up():
            return [None] * len(keys)
        out: list[bytes | None] = []
        try:
            for start in range(0, len(keys), _MGET_CHUNK):
                chunk = keys[start : start + _MGET_CHUNK]
                out += self._client.mget([KEY_PREFIX + k for k in chunk])
        except self._errors as e:
            self._failed("a lookup", e)
            return [None] * len(keys)
        return out

    def _put(self, key: bytes, blob: bytes) -> bool:
        if not self._up():
            return False
        try:
            return bool(self._client.set(KEY_PREFIX + key, blob, nx=True))
        except self._errors as e:
            self._failed("a store", e)
            return False

    def discard(self, key: bytes) -> None:
        if not self._up():
            return
        try:
            self._client.delete(KEY_PREFIX + key)
        except self._errors as e:
            self._failed("a delete", e)

    def close(self) -> None:
        self._client.close()
