"""The live cache view's data, built on the engine thread from the cache's event log
(`kvlm/kv/events.py`): one snapshot when a client connects, then one delta per engine step.

The watch costs nothing while no client is connected: it observes the engine and keeps the
event log attached only from the first subscriber to the last one leaving.

A delta carries only what the step changed: the new state of each block the pools reported,
the block tables of the requests whose tables changed, the ids of requests that let go of their
blocks, plus the running requests' token counts and the KV totals (a few numbers each). Only
the snapshot walks the whole pool. `CacheViewFormatter` is the third formatter beside the
completion ones: it shapes the stream's first event and its chunks; `CacheWatch` does the
plumbing (an engine observer: draining the log after each step, handing deltas to subscribers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel

from kvlm.engine.engine import LLMEngine
from kvlm.engine.observers import EngineObserver, RequestEvent, StepEvent
from kvlm.engine.request import Request
from kvlm.kv.block_pool import NULL_BLOCK_ID
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.events import BlockState, KVChanges, KVEventLog, block_state


class GroupInfo(BaseModel):
    label: str  # e.g. "30 layers, full, float32"
    num_blocks: int  # the null block (id 0) included
    block_size: int
    page_nbytes: int  # bytes of one block, all the group's layers


class RequestView(BaseModel):
    id: str
    num_tokens: int  # prompt plus generated so far
    num_computed_tokens: int  # of those, with K/V in the cache
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens reused from the prefix cache
    block_tables: list[list[int]] | None = None  # per group; None in a delta: unchanged


class CacheStats(BaseModel):
    step: int  # engine loop rounds since the view started watching
    num_running: int
    num_waiting: int
    bytes_used: list[int]  # per group, bytes of held blocks
    bytes_total: list[int]  # per group, bytes of all usable blocks
    prefix_queries: int  # prompt tokens looked up in the prefix cache, since start
    prefix_hits: int  # of those, tokens reused


class CacheSnapshot(BaseModel):
    type: Literal["snapshot"] = "snapshot"
    groups: list[GroupInfo]
    block_states: list[str]  # per group, one digit (a `BlockState`) per block id
    requests: list[RequestView]
    stats: CacheStats


class CacheDelta(BaseModel):
    type: Literal["delta"] = "delta"
    blocks: list[dict[int, int]]  # per group, block id -> its new `BlockState`
    requests: list[RequestView]  # running requests (tables only where they changed)
    removed: list[str]  # requests that no longer hold blocks (finished, aborted, preempted)
    stats: CacheStats

    def merge(self, later: CacheDelta) -> CacheDelta:
        """One delta with the effect of this one followed by `later` (for a slow client).

        A client applies `removed` before `requests`, so a request `later` removes leaves
        `requests`, and one `later` brings back keeps its removal (dropped, then re-added).
        """
        blocks = [{**a, **b} for a, b in zip(self.blocks, later.blocks, strict=True)]
        requests = {r.id: r for r in self.requests if r.id not in later.removed}
        for r in later.requests:
            earlier = requests.get(r.id)
            if r.block_tables is None and earlier is not None:
                r = r.model_copy(update={"block_tables": earlier.block_tables})
            requests[r.id] = r
        removed = list(dict.fromkeys(self.removed + later.removed))
        return CacheDelta(
            blocks=blocks, requests=list(requests.values()), removed=removed, stats=later.stats
        )


class BlockInfo(BaseModel):
    """What a click on a block shows."""

    group: int
    block_id: int
    state: int  # a `BlockState`
    ref_count: int
    holders: list[str]  # ids of the requests whose tables list the block
    text: str | None  # its tokens' text; None when its contents are unknown or meaningless
    num_tokens: int


class DeltaSink(Protocol):
    def put(self, delta: CacheDelta) -> bool:
        """Deliver a delta (engine thread); False when the subscriber is gone."""
        ...


class CacheViewFormatter:
    """Shapes the view's stream: the snapshot first (`stream_start`), then a delta per step
    (`chunk`). Reads engine state, so it runs on the engine thread."""

    def __init__(self, cache: KVCacheManager) -> None:
        self.cache = cache
        self.num_steps = 0  # engine rounds watched; counted by `CacheWatch`

    def stream_start(self, engine: LLMEngine) -> CacheSnapshot:
        labels = [label for label, _, _ in engine.kv_group_usage()]
        groups = [
            GroupInfo(
                label=label,
                num_blocks=pool.num_blocks,
                block_size=spec.block_size,
                page_nbytes=spec.page_nbytes,
            )
            for label, spec, pool in zip(labels, self.cache.specs, self.cache.pools, strict=True)
        ]
        states = ["".join(str(int(block_state(b))) for b in p.blocks) for p in self.cache.pools]
        requests = [self._request(r, True) for r in self._holding(engine)]
        return CacheSnapshot(
            groups=groups, block_states=states, requests=requests, stats=self._stats(engine)
        )

    def chunk(self, engine: LLMEngine, changes: KVChanges) -> CacheDelta:
        blocks = [
            {i: int(block_state(pool.blocks[i])) for i in ids}
            for pool, ids in zip(self.cache.pools, changes.block_ids, strict=True)
        ]
        changed = set(changes.request_ids)
        requests = [self._request(r, r.request_id in changed) for r in self._holding(engine)]
        removed = [rid for rid in changes.request_ids if not self.cache.holds(rid)]
        return CacheDelta(
            blocks=blocks, requests=requests, removed=removed, stats=self._stats(engine)
        )

    def _holding(self, engine: LLMEngine) -> list[Request]:
        return [r for r in engine.running_requests() if self.cache.holds(r.request_id)]

    def _request(self, request: Request, with_tables: bool) -> RequestView:
        tables = self.cache.block_tables(request.request_id) if with_tables else None
        return RequestView(
            id=request.request_id,
            num_tokens=len(request.token_ids),
            num_computed_tokens=request.num_computed_tokens,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.metrics.num_cached_tokens,
            block_tables=None if tables is None else [list(t) for t in tables],
        )

    def _stats(self, engine: LLMEngine) -> CacheStats:
        stats = engine.scheduler_stats
        return CacheStats(
            step=self.num_steps,
            num_running=len(engine.running_requests()),
            num_waiting=len(engine.waiting_requests()),
            bytes_used=self.cache.bytes_used(),
            bytes_total=self.cache.bytes_total(),
            prefix_queries=stats.num_prefix_queries,
            prefix_hits=stats.num_prefix_hits,
        )


@dataclass(frozen=True)
class _Contents:
    block_hash: bytes  # the block's name when these tokens filled it
    token_ids: tuple[int, ...]


class CacheWatch(EngineObserver):
    """Engine-thread side of the view: while a client is subscribed, observes the engine and,
    after each step (and each abort), drains the event log and hands one delta to every
    subscriber. Every method runs on the engine thread."""

    def __init__(self, engine: LLMEngine) -> None:
        if engine.kv_cache is None:
            raise ValueError("the engine runs without a KV cache: there is nothing to watch")
        self.engine = engine
        self.cache = engine.kv_cache
        self.tokenizer = engine.tokenizer
        self.log: KVEventLog | None = None  # attached while anyone is subscribed
        self.formatter = CacheViewFormatter(self.cache)
        self.subscribers: list[DeltaSink] = []
        # Per group, the tokens that filled each named block seen while watching, so a cached
        # block nobody holds still shows its text (the requests themselves are not kept).
        self.contents: list[dict[int, _Contents]] = [{} for _ in self.cache.groups]

    def on_step(self, event: StepEvent) -> None:
        size = self.cache.block_size
        for scheduled, tables in zip(event.scheduled, event.tables_after, strict=True):
            token_ids = scheduled.request.token_ids
            first, end = scheduled.start // size, scheduled.end // size  # blocks filled now
            for pool, contents, table in zip(self.cache.pools, self.contents, tables, strict=True):
                for index in range(first, min(end, len(table))):
                    block_id = table[index]
                    name = pool.blocks[block_id].block_hash
                    if block_id != NULL_BLOCK_ID and name is not None:
                        chunk = tuple(token_ids[index * size : (index + 1) * size])
                        contents[block_id] = _Contents(name, chunk)
        self._publish()

    def on_request(self, event: RequestEvent) -> None:
        if event.kind == "aborted":  # between steps: the freed blocks show now
            self._publish()

    def _publish(self) -> None:
        assert self.log is not None
        changes = self.log.drain()
        self.formatter.num_steps += 1
        delta = self.formatter.chunk(self.engine, changes)
        self.subscribers = [s for s in self.subscribers if s.put(delta)]
        if not self.subscribers:
            self._stop()

    def subscribe(self, engine: LLMEngine, sink: DeltaSink) -> CacheSnapshot:
        """The view now; `sink` gets every later step's delta until `unsubscribe`."""
        if not self.subscribers:  # the first one: start watching
            self.log = KVEventLog(self.cache)
            engine.add_observer(self)
        self.subscribers.append(sink)
        return self.formatter.stream_start(engine)

    def unsubscribe(self, sink: DeltaSink) -> None:
        if sink in self.subscribers:
            self.subscribers.remove(sink)
            if not self.subscribers:
                self._stop()

    def _stop(self) -> None:
        """The last subscriber left: stop observing, detach the log, forget the contents."""
        self.engine.remove_observer(self)
        if self.log is not None:
            self.log.detach()
            self.log = None
        self.contents = [{} for _ in self.cache.groups]

    def block_info(self, engine: LLMEngine, group: int, block_id: int) -> BlockInfo:
        """Holders and token text of one block; IndexError for a group or block not there."""
        if not 0 <= group < len(self.cache.pools):
            raise IndexError(f"no layer group {group}: there are {len(self.cache.pools)}")
        pool = self.cache.pools[group]
        if not 0 < block_id < pool.num_blocks:
            raise IndexError(f"layer group {group} has blocks 1 to {pool.num_blocks - 1}")
        block = pool.blocks[block_id]
        holders = [rid for rid, t in self.cache.groups[group].tables.items() if block_id in t]
        token_ids = self._contents(engine, group, block_id, holders)
        return BlockInfo(
            group=group,
            block_id=block_id,
            state=int(block_state(block)),
            ref_count=block.ref_count,
            holders=holders,
            text=None if token_ids is None else self.tokenizer.decode(token_ids, False),
            num_tokens=0 if token_ids is None else len(token_ids),
        )

    def _contents(
        self, engine: LLMEngine, group: int, block_id: int, holders: list[str]
    ) -> list[int] | None:
        """The token ids whose K/V the block holds: from a holder's computed tokens, or, for a
        cached block nobody holds, the tokens seen filling it if it still has that name (so a
        block reused since is never described by old text)."""
        size = self.cache.block_size
        for rid in holders:
            request = engine.requests.get(rid)
            if request is not None:
                index = self.cache.block_tables(rid)[group].index(block_id)
                end = min((index + 1) * size, request.num_computed_tokens)
                return request.token_ids[index * size : end]
        block = self.cache.pools[group].blocks[block_id]
        seen = self.contents[group].get(block_id)
        if seen is None or block_state(block) != BlockState.CACHED:
            return None
        return list(seen.token_ids) if seen.block_hash == block.block_hash else None
