"""The one driver behind both generation routes: read the body, prepare the request on a
worker thread, submit it, then stream server-sent events or wait for the whole response.

Routes differ only in their `API`: how a body becomes a prompt and params, and which
`Formatter` shapes the output. A request's blocks go back to the pool however the client
leaves (see `serving.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvlm.engine.async_engine import RequestStream
from kvlm.engine.request import RequestOutput
from kvlm.sampling import Logprob
from kvlm.server.formatters import ChatFormatter, CompletionFormatter, Formatter, Header
from kvlm.server.limits import ModelLimits
from kvlm.server.metrics import RequestTimer
from kvlm.server.params import Prepared, prepare_chat, prepare_completion
from kvlm.server.responses import new_id, now
from kvlm.server.serving import (
    SSE_DONE,
    ServingContext,
    collect,
    guarded_events,
    merged,
    sse,
    submit,
)
from kvlm.tokenizer import Tokenizer


@dataclass(frozen=True)
class API:
    """What one route adds to the shared driver."""

    id_prefix: str
    prompt_param: str  # the field an engine refusal of the prompt names
    prepare: Callable[[bytes, Tokenizer, ModelLimits], Prepared]
    formatter: Callable[[Prepared, Tokenizer, Header], Formatter]


COMPLETIONS = API("cmpl", "prompt", prepare_completion, CompletionFormatter)
CHAT_COMPLETIONS = API("chatcmpl", "messages", prepare_chat, ChatFormatter)


async def generate(ctx: ServingContext, api: API, client: Request) -> Response:
    timer = ctx.metrics.timer()  # latencies count from the request's arrival
    raw = await client.body()  # at most --max-request-bytes (`limits.BodySizeLimitMiddleware`)
    tokenizer = ctx.engine.tokenizer
    # JSON parsing, the chat template and tokenizing take long for a long prompt: off the loop.
    prepared = await asyncio.to_thread(api.prepare, raw, tokenizer, ctx.limits)
    request_id = new_id(api.id_prefix)
    body = prepared.body
    streams = await submit(ctx, prepared, request_id, api.prompt_param)
    formatter = api.formatter(prepared, tokenizer, Header(request_id, now(), ctx.model_name))
    timers = [timer] + [timer.sibling() for _ in range(formatter.num_choices - 1)]
    if body.stream:
        events = _events(formatter, streams, timers, body.include_usage)
        return StreamingResponse(guarded_events(events, streams), media_type="text/event-stream")
    finals = await collect(streams, client, timers, formatter.n)
    return JSONResponse(formatter.response(finals).model_dump(mode="json"))


@dataclass
class _Unsent:
    """What one choice's stream holds back: tokens whose text is not shown yet."""

    started: bool = False  # its first chunks went out
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None


async def _events(
    formatter: Formatter,
    streams: list[RequestStream],
    timers: list[RequestTimer],
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    """The choices' chunks interleaved as their outputs come, each tagged with its index
    (a prompt's stream carries its n completions), then the usage of all (if asked for) and
    one [DONE]."""
    for chunk in formatter.stream_start():
        yield sse(chunk)
    unsent = [_Unsent() for _ in range(formatter.num_choices)]
    last: dict[int, RequestOutput] = {}
    async for prompt_index, delta in merged(streams):
        last[prompt_index] = delta
        for index, _, completion in formatter.choices([delta]):
            index += prompt_index * formatter.n
            held = unsent[index]
            timers[index].on_output(len(completion.token_ids), completion.finish_reason)
            if not held.started:
                held.started = True
                for chunk in formatter.first_chunks(index, delta):
                    yield sse(chunk)
            held.token_ids += completion.token_ids
            if completion.logprobs is not None:
                held.logprobs = (held.logprobs or []) + completion.logprobs
            if not completion.text and completion.finish_reason is None:
                continue  # nothing to show yet (a partial character or a possible stop string)
            text = completion.text
            yield sse(formatter.chunk(index, text, held.token_ids, held.logprobs, completion))
            unsent[index] = _Unsent(started=True)
    if include_usage and len(last) == len(streams):
        yield sse(formatter.usage_chunk(formatter.usage([last[i] for i in range(len(streams))])))
    yield SSE_DONE
