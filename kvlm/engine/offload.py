"""Between the cache and the offload tiers: evicted blocks go out, a later prefix comes back.

Out: the connector listens for evictions (`KVCacheManager.add_evict_listener`): told of each
cached block about to be reused, it copies the block's page once (a device-side copy, queued)
and hands it to a writer thread, which seals and writes it to the tiers. The step never waits on a
tier; past `max_pending_writes` blocks in flight, new evictions are dropped (and counted).

In: when a waiting request is about to be admitted, the scheduler asks `start_load`. If the
tiers may hold blocks beyond what the pool has cached for its prompt, a loader thread fetches
them (stopping at the first block no tier has) and the request steps aside; other requests keep
running and being admitted. Once the fetch is done, `finished_loads` writes the blocks into the
pools (named, free) on the engine thread and hands the request back: its admission is then an
ordinary prefix hit. A failed or empty fetch just means the request recomputes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from kvlm.engine.request import Request
from kvlm.kv.block_codec import CorruptBlockError, decode_pages, seal, unseal
from kvlm.kv.fingerprint import CacheIdentity
from kvlm.kv.offload.tier import TierSnapshot
from kvlm.kv.offload.tiered import TieredStore
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.transfer import BlockTransfer, GroupPages, PrefixBlocks

logger = logging.getLogger(__name__)
MAX_PENDING_WRITES = 256
_FETCH_CHUNK = 16  # blocks looked up per round trip


@dataclass
class _Load:
    hashes: list[bytes]
    future: Future[PrefixBlocks]


class OffloadConnector:
    def __init__(
        self,
        tiers: TieredStore,
        identity: CacheIdentity,
        transfer: BlockTransfer,
        max_pending_writes: int = MAX_PENDING_WRITES,
    ) -> None:
        self.tiers = tiers
        self.identity = identity
        self.transfer = transfer
        self.cache = transfer.cache
        self.block_size = transfer.block_size
        self.max_pending_writes = max_pending_writes
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvlm-offload-write")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvlm-offload-load")
        self._pending = 0  # writes submitted, not done
        self._pending_lock = threading.Lock()
        self._writes_done = threading.Condition(self._pending_lock)
        self.num_dropped_writes = 0
        self._loads: dict[str, _Load] = {}  # request id -> fetch in flight or done
        self._probed: set[str] = set()  # requests already offered a load (one each)
        self.cache.add_evict_listener(self._on_evict)

    # --- out: evicted blocks to the tiers -----------------------------------------------

    def _on_evict(self, group: int, block_id: int, block_hash: bytes) -> None:
        """Engine thread, inside an allocation: copy the page, queue the write, return."""
        with self._pending_lock:
            if self._pending >= self.max_pending_writes:
                self.num_dropped_writes += 1
                return
            self._pending += 1
        page = self.transfer.stores[group].read_pages([block_id])  # [1, page_nbytes]
        key = self.identity.block_key(group, block_hash)
        self._writer.submit(self._write, key, page)

    def _write(self, key: bytes, page: torch.Tensor) -> None:
        try:
            self.tiers.put(key, seal(key, page.cpu().numpy().tobytes()))
        except Exception:  # a bug in a tier: log it, never take the engine down
            logger.exception("offload write failed")
        finally:
            with self._pending_lock:
                self._pending -= 1
                self._writes_done.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write reached the tiers; False on timeout."""
        with self._pending_lock:
            return self._writes_done.wait_for(lambda: self._pending == 0, timeout)

    # --- in: a waiting request's prefix from the tiers -----------------------------------

    def start_load(self, request: Request, block_hashes: list[bytes]) -> bool:
        """Engine thread, before admitting `request`: True if a fetch started (the request
        must wait for `finished_loads`), False to admit it now. Offered once per request."""
        if request.request_id in self._probed:
            return False
        self._probed.add(request.request_id)
        num_tokens = len(request.token_ids)
        max_blocks = min(len(block_hashes), (num_tokens - 1) // self.block_size)
        first = self.cache.find_cached_prefix(block_hashes, num_tokens).num_tokens
        first //= self.block_size
        if first >= max_blocks:
            return False
        # Per group, which of the wanted blocks the pool holds already (no fetch for those).
        in_pool = [
            [self.cache.is_cached(g, block_hashes[i]) for i in range(first, max_blocks)]
            for g in range(len(self.cache.specs))
        ]
        keys = [self.identity.block_key(g, block_hashes[first]) for g in range(len(in_pool))]
        if not all(
            held[0] or self.tiers.may_have(k) for held, k in zip(in_pool, keys, strict=True)
        ):
            return False
        hashes = block_hashes[:max_blocks]
        future = self._loader.submit(self._fetch, hashes, first, in_pool)
        self._loads[request.request_id] = _Load(hashes, future)
        return True

    def _fetch(self, hashes: list[bytes], first: int, in_pool: list[list[bool]]) -> PrefixBlocks:
        """Loader thread: blocks `first..` of `hashes` the pool lacked, up to the first one no
        tier holds (or holds damaged). Blocks before `first` are left to the pool."""
        num_groups = len(in_pool)
        found_pages: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(num_groups)]
        end = first
        while end < len(hashes):
            indices = range(end, min(end + _FETCH_CHUNK, len(hashes)))
            wanted = [
                (g, i) for i in indices for g in range(num_groups) if not in_pool[g][i - first]
            ]
            keys = [self.identity.block_key(g, hashes[i]) for g, i in wanted]
            found = dict(zip(wanted, self.tiers.get_many(keys), strict=True))
            for i in indices:
                row = [
                    None if in_pool[g][i - first] else self._decode(g, hashes[i], found[(g, i)])
                    for g in range(num_groups)
                ]
                if any(page is None and not in_pool[g][i - first] for g, page in enumerate(row)):
                    return _prefix(end, found_pages, self.identity.specs)
                for g, page in enumerate(row):
                    if page is not None:
                        found_pages[g].append((i, page))
                end += 1
        return _prefix(end, found_pages, self.identity.specs)

    def _decode(self, group: int, block_hash: bytes, hit: tuple | None) -> torch.Tensor | None:
        """The block's page ([1, page_nbytes]) from a tier's blob, or None (absent, damaged)."""
        if hit is None:
            return None
        blob, tier = hit
        key = self.identity.block_key(group, block_hash)
        try:
            page = decode_pages(self.identity.specs[group], unseal(key, blob), 1)
        except CorruptBlockError as e:
            logger.warning("offload tier %s returned a damaged block, dropped: %s", tier.name, e)
            tier.stats.add(failures=1)
            tier.discard(key)  # the recomputed block can be stored again
            return None
        self.tiers.promote(key, blob, tier)
        return page

    def finished_loads(self) -> list[str]:
        """Engine thread: import every finished fetch into the pools; the ids of the requests
        that may be admitted now (in the order their loads started)."""
        done = []
        for request_id, load in list(self._loads.items()):
            if not load.future.done():
                continue
            del self._loads[request_id]
            done.append(request_id)
            try:
                prefix = load.future.result()
            except Exception:  # a bug in the fetch: the request recomputes
                logger.exception("offload fetch failed")
                continue
            if prefix.num_blocks:
                self.transfer.import_prefix(load.hashes, prefix)
        return done

    def wait_for_load(self, timeout: float) -> None:
        """Block until some fetch finishes (or `timeout`): when nothing else can run."""
        futures = [load.future for load in self._loads.values()]
        if futures:
            wait(futures, timeout, return_when="FIRST_COMPLETED")

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted: drop its fetch, if any."""
        self._probed.discard(request_id)
        self._loads.pop(request_id, None)

    def snapshot(self) -> tuple[TierSnapshot, ...]:
        return self.tiers.snapshot()

    def close(self) -> None:
        """Stop listening, finish queued writes, stop the threads, close the tiers."""
        self.cache.remove_evict_listener(self._on_evict)
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
        self.tiers.close()


def _prefix(
    num_blocks: int, found: list[list[tuple[int, torch.Tensor]]], specs: Sequence[KVCacheSpec]
) -> PrefixBlocks:
    """The fetched pages (all of blocks below `num_blocks`), per group in block order."""
    groups = []
    for spec, pages in zip(specs, found, strict=True):
        stacked = (
            torch.cat([page for _, page in pages])
            if pages
            else torch.empty((0, spec.page_nbytes), dtype=torch.uint8)
        )
        groups.append(GroupPages([i for i, _ in pages], stacked))
    return PrefixBlocks(num_blocks, groups)
