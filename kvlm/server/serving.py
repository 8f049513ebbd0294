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
from kvlm.engine.engine import InputError
from kvlm.engine.request import OutputAccumulator, RequestOutput
from kvlm.sampling import SamplingParams
from kvlm.server.errors import APIError, server_error
from kvlm.server.limits import ModelLimits
from kvlm.server.metrics import RequestTimer, ServerMetrics
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
    ctx: ServingContext,
    prompt: Prompt,
    params: SamplingParams,
    request_id: str,
    cache_salt: str | None,
    prompt_param: str,
    prefix_adapter: str | None = None,
) -> RequestStream:
    """Hand the request to the engine; the engine's refusals become 400s."""
    try:
        return await ctx.engine.add_request(
            prompt.text, prompt.token_ids, params, request_id, cache_salt, prefix_adapter
        )
    except InputError as e:
        raise APIError(str(e), param=prompt_param) from e
    except EngineDeadError as e:
        raise _engine_dead(e) from e


async def collect(stream: RequestStream, client: Request, timer: RequestTimer) -> RequestOutput:
    """Wait for the last output and return the whole (assembled) output; abort the request
    if the client goes away meanwhile."""

    async def drain() -> RequestOutput:
        accumulated = OutputAccumulator()
        async for delta in stream:
            completion = delta.outputs[0]
            timer.on_output(len(completion.token_ids), completion.finish_reason)
            accumulated.add(delta)
        final = accumulated.build()
        assert final.finished
        return final

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await client.is_disconnected():
                raise ClientDisconnected(stream.request_id)
    except EngineStepError as e:
        raise server_error(e) from e
    except EngineDeadError as e:
        raise _engine_dead(e) from e
    finally:
        task.cancel()
        stream.abort()


def _engine_dead(error: EngineDeadError) -> APIError:
    return APIError(str(error), status_code=503, type="server_error", code="engine_dead")


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


async def guarded_events(
    events: AsyncGenerator[str, None], stream: RequestStream
) -> AsyncIterator[str]:
    """Pass `events` through; an engine failure becomes an error event. Always aborts the
    request at the end (a no-op when it finished), also when the client disconnected."""
    try:
        async for event in events:
            yield event
    except (EngineStepError, EngineDeadError) as e:
        yield sse(server_error(e).to_dict())
        yield SSE_DONE
    finally:
        stream.abort()
        await events.aclose()
