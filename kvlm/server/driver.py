"""The one driver behind both generation routes: read the body, prepare the request on a
worker thread, submit it, then stream server-sent events or wait for the whole response.

Routes differ only in their `API`: how a body becomes a prompt and params, and which
`Formatter` shapes the output. A request's blocks go back to the pool however the client
leaves (see `serving.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvlm.engine.async_engine import RequestStream
from kvlm.sampling import Logprob
from kvlm.server.formatters import ChatFormatter, CompletionFormatter, Formatter, Header
from kvlm.server.limits import ModelLimits
from kvlm.server.metrics import RequestTimer
from kvlm.server.params import Prepared, prepare_chat, prepare_completion
from kvlm.server.responses import Usage, new_id, now
from kvlm.server.serving import SSE_DONE, ServingContext, collect, guarded_events, sse, submit
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
    stream = await submit(
        ctx,
        prepared.prompt,
        prepared.params,
        request_id,
        body.cache_salt,
        api.prompt_param,
        prepared.prefix_adapter,
    )
    formatter = api.formatter(prepared, tokenizer, Header(request_id, now(), ctx.model_name))
    if body.stream:
        events = _events(formatter, stream, timer, body.include_usage)
        return StreamingResponse(guarded_events(events, stream), media_type="text/event-stream")
    final = await collect(stream, client, timer)
    return JSONResponse(formatter.response(final).model_dump(mode="json"))


async def _events(
    formatter: Formatter, stream: RequestStream, timer: RequestTimer, include_usage: bool
) -> AsyncGenerator[str, None]:
    for chunk in formatter.stream_start():
        yield sse(chunk)
    token_ids: list[int] = []  # tokens not sent yet (their text may be held back)
    logprobs: list[dict[int, Logprob]] | None = None
    last = None
    async for delta in stream:
        last, completion = delta, delta.outputs[0]
        timer.on_output(len(completion.token_ids), completion.finish_reason)
        token_ids += completion.token_ids
        if completion.logprobs is not None:
            logprobs = (logprobs or []) + completion.logprobs
        if not completion.text and completion.finish_reason is None:
            continue  # nothing to show yet (a partial character or a possible stop string)
        yield sse(formatter.chunk(completion.text, token_ids, logprobs, completion))
        token_ids, logprobs = [], None
    if include_usage and last is not None:
        yield sse(formatter.usage_chunk(Usage.of(last)))
    yield SSE_DONE
