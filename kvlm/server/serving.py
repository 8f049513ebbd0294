"""Submitting a request, waiting for it while watching the client, and server-sent events.

A request's blocks must go back to the pool however the client leaves: every path that stops
reading a `RequestStream` before its last output calls `stream.abort()` (idempotent).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from kvlm.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineStepError,
    RequestStream,
)
from kvlm.engine.engine import InputError, PressRefusedError
from kvlm.engine.request import OutputAccumulator, RequestOutput
from kvlm.sampling import SamplingParams
from kvlm.server.errors import APIError, server_error
from kvlm.server.limits import ModelLimits
from kvlm.server.metrics import RequestTimer, ServerMetrics
from kvlm.server.params import Prepared
from kvlm.server.press import PARAM as PRESS_PARAM
from kvlm.server.prompts import Prompt

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there
SSE_DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


@dataclass(frozen=True)
class ServingContext:
    engine: AsyncLLMEngine
    limits: ModelLimits
    metrics: ServerMetrics

    @property
    def model_name(self) -> str:
        return self.limits.name


async def submit(
    ctx: ServingContext, prepared: Prepared, request_id: str, prompt_param: str
) -> list[RequestStream]:
    """Hand every prompt of the request to the engine at once (one engine request each, ids
    `request_id` or `request_id-i`, queued in the same loop turn so they are scheduled
    together); the engine's refusals become 400s (naming `kv_press` when the press is
    refused, else the prompt), and when one prompt is refused the others are aborted."""
    several = len(prepared.prompts) > 1
    cache_salt = prepared.body.cache_salt

    async def add(i: int, prompt: Prompt, params: SamplingParams) -> RequestStream:
        try:
            return await ctx.engine.add_request(
                prompt.text,
                prompt.token_ids,
                params,
                f"{request_id}-{i}" if several else request_id,
                cache_salt,
                prepared.prefix_adapter,
            )
        except PressRefusedError as e:
            raise APIError(str(e), param=PRESS_PARAM) from e
        except InputError as e:
            raise APIError(str(e), param=f"{prompt_param}.{i}" if several else prompt_param) from e
        except EngineDeadError as e:
            raise _engine_dead(e) from e

    pairs = zip(prepared.prompts, prepared.params, strict=True)
    added = await asyncio.gather(
        *(add(i, *pair) for i, pair in enumerate(pairs)), return_exceptions=True
    )
    streams = [s for s in added if isinstance(s, RequestStream)]
    refused = [e for e in added if isinstance(e, BaseException)]
    if refused:
        for stream in streams:
            stream.abort()
        raise refused[0]
    return streams


async def collect(
    streams: list[RequestStream], client: Request, timers: list[RequestTimer], n: int = 1
) -> list[RequestOutput]:
    """Wait for each stream's last output and return the whole (assembled) outputs, in order;
    abort every request if the client goes away meanwhile. Each stream (prompt) carries `n`
    completions, timed by `timers[prompt * n + completion index]`."""

    async def drain(stream: RequestStream, timers: list[RequestTimer]) -> RequestOutput:
        accumulated = OutputAccumulator()
        async for delta in stream:
            for completion in delta.outputs:
                timers[completion.index].on_output(
                    len(completion.token_ids), completion.finish_reason
                )
            accumulated.add(delta)
        final = accumulated.build()
        assert final.finished
        return final

    task = asyncio.gather(*(drain(s, timers[i * n : (i + 1) * n]) for i, s in enumerate(streams)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await client.is_disconnected():
                raise ClientDisconnected(streams[0].request_id)
    except EngineStepError as e:
        raise server_error(e) from e
    except EngineDeadError as e:
        raise _engine_dead(e) from e
    finally:
        task.cancel()
        for stream in streams:
            stream.abort()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every stream's outputs as they come, each tagged with its stream's index (each
    stream's in order; outputs ready at once in index order)."""
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[index]))] = index
                yield index, output
    finally:
        for task in pending:
            task.cancel()


def _engine_dead(error: EngineDeadError) -> APIError:
    return APIError(str(error), status_code=503, type="server_error", code="engine_dead")


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


async def guarded_events(
    events: AsyncGenerator[str, None], streams: list[RequestStream]
) -> AsyncIterator[str]:
    """Pass `events` through; an engine failure becomes an error event. Always aborts every
    request at the end (a no-op for one that finished), also when the client disconnected."""
    try:
        async for event in events:
            yield event
    except (EngineStepError, EngineDeadError) as e:
        yield sse(server_error(e).to_dict())
        yield SSE_DONE
    finally:
        for stream in streams:
            stream.abort()
        await events.aclose()
