"""What the engine tells the tools that watch it, and how they subscribe.

An `EngineObserver` registered with `LLMEngine.add_observer` hears, on the engine's thread:
- `on_request`: a request's lifecycle (added, admitted with its cached tokens, preempted,
  finished, aborted);
- `on_forward`: after each forward pass, while the K/V it wrote are in the stores and before
  the cache update lets a window free blocks (the moment to read them back);
- `on_step`: at the end of each step, with the batch, every group's block tables as they were
  during the forward pass and after the cache update, and the step's outputs.

Events are frozen snapshots, except the `Request` objects they name: those are the engine's
own and keep changing, so read them during the call and never modify them. With no observer
registered the engine builds no event at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from kvlm.engine.request import Request, RequestOutput
    from kvlm.kv.cache_manager import KVCacheManager

# Per group, one request's block table (block ids, a window's freed places hold the null block).
BlockTables = tuple[tuple[int, ...], ...]
RequestEventKind = Literal["added", "admitted", "preempted", "finished", "aborted"]


@dataclass(frozen=True)
class RequestEvent:
    kind: RequestEventKind
    request: Request
    # "admitted": prompt tokens whose K/V came from the prefix cache this time (0 otherwise)
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int  # tokens whose K/V were in the cache before the step
    num_tokens: int  # tokens computed in the step: positions [start, start + num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class ForwardEvent:
    """The forward pass has written the step's K/V; nothing has been freed or named yet."""

    step: int  # steps this engine has run, this one included
    scheduled: tuple[ScheduledRequest, ...]
    tables: tuple[BlockTables, ...]  # per scheduled request, the tables the pass used


@dataclass(frozen=True)
class StepEvent:
    step: int
    scheduled: tuple[ScheduledRequest, ...]
    tables_written: tuple[BlockTables, ...]  # per scheduled request, during the forward pass
    # per scheduled request, after full blocks were named and windows let blocks go (before
    # a request that finished in this step freed its blocks)
    tables_after: tuple[BlockTables, ...]
    outputs: tuple[RequestOutput, ...]  # what `step()` returns


class EngineObserver:
    """Subclass and override what you need; every method runs on the engine's thread inside
    `add_request`, `step` or `abort`, so it must be quick. The defaults do nothing."""

    def on_request(self, event: RequestEvent) -> None:
        pass

    def on_forward(self, event: ForwardEvent) -> None:
        pass

    def on_step(self, event: StepEvent) -> None:
        pass


class Observers:
    """The engine's registered observers, and the events it builds only while there are some.
    Each call hands the event to every observer in the order they were added."""

    def __init__(self) -> None:
        self._observers: list[EngineObserver] = []

    def __bool__(self) -> bool:
        return bool(self._observers)

    def add(self, observer: EngineObserver) -> None:
        if observer in self._observers:
            raise ValueError(f"{observer!r} already observes this engine")
        self._observers.append(observer)

    def remove(self, observer: EngineObserver) -> None:
        """Stop calling `observer` (a no-op if it was not registered)."""
        if observer in self._observers:
            self._observers.remove(observer)

    def request(self, event: RequestEvent) -> None:
        for observer in list(self._observers):  # an observer may remove itself
            observer.on_request(event)

    def forward(
        self,
        step: int,
        requests: Sequence[Request],
        num_new_tokens: Sequence[int],
        cache: KVCacheManager | None,
    ) -> ForwardEvent:
        """Call right after the forward pass, before the cache update (requests' computed
        counts are still those the step started from)."""
        scheduled = tuple(
            ScheduledRequest(r, r.num_computed_tokens, n)
            for r, n in zip(requests, num_new_tokens, strict=True)
        )
        event = ForwardEvent(step, scheduled, block_tables(scheduled, cache))
        for observer in list(self._observers):
            observer.on_forward(event)
        return event

    def step(
        self,
        forward: ForwardEvent,
        tables_after: tuple[BlockTables, ...],
        outputs: Sequence[RequestOutput],
    ) -> None:
        event = StepEvent(
            forward.step, forward.scheduled, forward.tables, tables_after, tuple(outputs)
        )
        for observer in list(self._observers):
            observer.on_step(event)


def block_tables(
    scheduled: Sequence[ScheduledRequest], cache: KVCacheManager | None
) -> tuple[BlockTables, ...]:
    """Per scheduled request, a copy of its block tables now (empty without a cache)."""
    if cache is None:
        return tuple(() for _ in scheduled)
    return tuple(
        tuple(tuple(table) for table in cache.block_tables(s.request.request_id)) for s in scheduled
    )
