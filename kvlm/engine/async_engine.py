"""`AsyncLLMEngine`: one `LLMEngine` driven by one thread, fed by asyncio callers.

The engine is not thread-safe, so every engine call (add_request, abort, step) happens on the
engine thread. Callers on an event loop submit commands through a locked queue and receive
outputs through a per-request `asyncio.Queue`, filled with `loop.call_soon_threadsafe`. The
thread sleeps on a condition variable while there is neither a command nor an unfinished
request; it never busy-waits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from kvlm.engine.engine import LLMEngine
from kvlm.engine.request import RequestOutput
from kvlm.engine.speculative import SpeculativeStats
from kvlm.engine.step_threads import StepThreads
from kvlm.kv.offload.tier import TierSnapshot
from kvlm.sampling import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class EngineStepError(RuntimeError):
    """`LLMEngine.step()` raised while this request was in the batch; the request was aborted."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken on the engine thread after each step; replaced whole, never mutated.

    Counters are cumulative since start. `num_blocks_used` counts blocks held by a request:
    a finished request's hashed blocks sit in the free queue (ref_count 0) and are not used.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV bytes held, all layer groups
    # Per layer group: (label like "layers 0-29, window 512, int8", bytes held, bytes in all)
    kv_groups: tuple[tuple[str, int, int], ...] = ()
    num_prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hits: int = 0  # of those, tokens whose K/V were reused
    num_preemptions: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of accepted requests
    num_generation_tokens: int = 0
    num_steps: int = 0
    num_step_errors: int = 0
    kv_offload: tuple[TierSnapshot, ...] = ()  # per offload tier (RAM, disk, Redis), if any
    num_offload_dropped_writes: int = 0  # evicted blocks not offloaded: too many writes queued
    # Speculative decoding (kvlm.engine.speculative.SpeculativeStats); None when it is off
    speculative: SpeculativeStats | None = None
    taken_at: float = 0.0  # time.time()

    @property
    def num_blocks_used(self) -> int:
        return self.num_blocks - self.num_free_blocks


_ACCEPTED = object()  # first item of a stream once the engine thread has queued the request


class RequestStream:
    """Outputs of one request, as an async iterator; the last one has `finished=True`.

    Each output is a delta (what the step added: `LLM.stream` explains the kind); an
    `OutputAccumulator` assembles the whole.

    Items are put by the engine thread; `abort()` (idempotent, any thread) stops the request
    in the engine and frees its blocks unless it already finished.
    """

    def __init__(self, engine: AsyncLLMEngine, request_id: str) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException | object) -> bool:
        """Engine thread: deliver an item; False when the caller's loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed
            return False
        return True

    async def wait_accepted(self) -> None:
        """Return once the engine has queued the request; raise what add_request raised."""
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the add may still land, so take it back
            self.abort()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert item is _ACCEPTED

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine._submit(_Abort(self))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:  # the last output was returned, an error raised, or aborted
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert isinstance(item, RequestOutput)
        if item.finished:
            self.finished = True
        return item


@dataclass(frozen=True)
class _Add:
    stream: RequestStream
    prompt: str | None
    prompt_token_ids: Sequence[int] | None
    params: SamplingParams
    cache_salt: str | None
    prefix_adapter: str | None = None


@dataclass(frozen=True)
class _Abort:
    stream: RequestStream


@dataclass(frozen=True)
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: Future[Any]


_Command = _Add | _Abort | _Call


class AsyncLLMEngine:
    """Serve one `LLMEngine` to asyncio callers from a dedicated thread (started at once)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.unbounded_length = engine.unbounded_length  # sinks: generation may pass the context
        self.vocab_size = engine.model_config.vocab_size  # logits rows: valid token ids
        adapters = engine.prefix_adapters
        self.prefix_adapters = () if adapters is None else tuple(adapters.names)
        self._cond = threading.Condition()
        self._commands: deque[_Command] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._closed = False  # guarded by _cond: the thread has ended
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._num_prompt_tokens = 0  # engine thread only
        self._num_generation_tokens = 0
        self._num_steps = 0
        self._num_step_errors = 0
        self._stats = EngineStats()
        self._publish_stats()
        self._step_threads = StepThreads(torch.get_num_threads())  # the engine set the count
        self._thread = threading.Thread(target=self._run, name="kvlm-engine", daemon=True)
        self._thread.start()

    # --- caller side (any thread / event loop) -------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The latest snapshot (a reference swap, so no lock is needed to read it)."""
        return self._stats

    async def add_request(
        self,
        prompt: str | None,
        prompt_token_ids: Sequence[int] | None,
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        prefix_adapter: str | None = None,
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it; raises InputError etc.

        The caller must `abort()` the stream if it stops reading before the last output.
        """
        if not self.is_alive:
            raise EngineDeadError("the engine thread has stopped; restart the server")
        stream = RequestStream(self, request_id or uuid.uuid4().hex)
        self._submit(_Add(stream, prompt, prompt_token_ids, params, cache_salt, prefix_adapter))
        await stream.wait_accepted()
        return stream

    async def generate(
        self,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield each (delta) output of one request; aborts it if the consumer stops early."""
        stream = await self.add_request(
            prompt, prompt_token_ids, params or SamplingParams(), request_id, cache_salt
        )
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread between steps (e.g. to inspect the cache)."""
        future: Future[T] = Future()
        self._submit(_Call(fn, future))
        return future

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; unfinished requests get EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _submit(self, command: _Command) -> None:
        with self._cond:
            if not self._closed:
                self._commands.append(command)
                self._cond.notify()
                return
        _refuse(command)

    # --- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or self.engine.has_unfinished()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._apply_safely(command)
                if self.engine.has_unfinished():
                    self._step()
                self._publish_stats()
        except BaseException:
            logger.exception("the engine thread crashed")
        finally:
            torch.set_num_threads(self._step_threads.threads)  # as the engine left it
            with self._cond:
                self._closed = True
                pending = list(self._commands)
                self._commands.clear()
            for command in pending:
                _refuse(command)
            self._fail(list(self._streams), EngineDeadError("the engine has shut down"))

    def _apply_safely(self, command: _Command) -> None:
        try:
            self._apply(command)
        except Exception as e:  # a bug, not bad input: log it, fail the request, keep serving
            logger.exception("engine command %s failed", type(command).__name__)
            if isinstance(command, _Add):
                if command.stream.request_id in self._streams:
                    self._fail([command.stream.request_id], e)
                else:
                    command.stream.put(e)

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Call):
            try:
                command.future.set_result(command.fn(self.engine))
            except Exception as e:
                command.future.set_exception(e)
            return
        stream = command.stream
        if isinstance(command, _Abort):
            if self._streams.get(stream.request_id) is stream:  # not a namesake's request
                del self._streams[stream.request_id]
                self._abort(stream.request_id)
            return
        try:
            self.engine.add_request(
                command.prompt,
                command.prompt_token_ids,
                command.params,
                command.cache_salt,
                stream.request_id,
                command.prefix_adapter,
            )
        except Exception as e:  # InputError and friends: the caller of add_request gets it
            stream.put(e)
            return
        self._streams[stream.request_id] = stream
        request = self.engine.requests[stream.request_id]
        self._num_prompt_tokens += request.metrics.num_prompt_tokens  # no virtual tokens
        if not stream.put(_ACCEPTED):  # the caller's event loop is gone
            del self._streams[stream.request_id]
            self._abort(stream.request_id)

    def _abort(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except Exception:  # a bug in the engine: log it and keep serving the others
            logger.exception("could not abort request %s", request_id)

    def _step(self) -> None:
        running, waiting = self.engine.running_requests(), self.engine.waiting_requests()
        self._step_threads.apply(len(running) + len(waiting))
        try:
            outputs = self.engine.step()
        except Exception as e:
            # Fail the requests that were in the batch (the running ones; when none runs, the
            # waiting ones that could not be scheduled) and keep serving the rest.
            self._num_step_errors += 1
            running, waiting = self.engine.running_requests(), self.engine.waiting_requests()
            affected = [r.request_id for r in running or waiting]
            logger.exception("engine step failed; aborting %d request(s)", len(affected))
            error = EngineStepError(f"the engine failed while running this request: {e!r}")
            self._fail(affected, error)
            return
        self._num_steps += 1
        # An output carries one new token, or several after accepted speculative drafts.
        self._num_generation_tokens += sum(len(c.token_ids) for o in outputs for c in o.outputs)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            if not stream.put(output) and not output.finished:
                del self._streams[output.request_id]
                self._abort(output.request_id)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            self._abort(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)

    def _publish_stats(self) -> None:
        engine = self.engine
        cache, stats, spec = engine.kv_cache, engine.scheduler_stats, engine.speculative_stats
        pools = cache.pools if cache else []
        self._stats = EngineStats(
            num_running=len(engine.running_requests()),
            num_waiting=len(engine.waiting_requests()),
            num_blocks=sum(p.num_usable_blocks for p in pools),
            num_free_blocks=sum(p.num_free_blocks for p in pools),
            kv_cache_usage=cache.usage if cache else 0.0,
            kv_groups=engine.kv_group_usage() if cache else (),
            num_prefix_queries=stats.num_prefix_queries,
            num_prefix_hits=stats.num_prefix_hits,
            num_preemptions=stats.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            num_steps=self._num_steps,
            num_step_errors=self._num_step_errors,
            kv_offload=engine.offload.snapshot() if engine.offload else (),
            num_offload_dropped_writes=engine.offload.num_dropped_writes if engine.offload else 0,
            speculative=None if spec is None else replace(spec),
            taken_at=time.time(),
        )


def _refuse(command: _Command) -> None:
    """Answer a command the stopped engine will never run."""
    error = EngineDeadError("the engine has shut down")
    if isinstance(command, _Add):
        command.stream.put(error)
    elif isinstance(command, _Call):
        command.future.set_exception(error)
