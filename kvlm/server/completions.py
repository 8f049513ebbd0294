"""`POST /v1/completions`: one prompt (text or token ids) -> one completion, or its stream."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvlm.engine.async_engine import RequestStream
from kvlm.server.metrics import RequestTimer
from kvlm.server.params import check_model, completion_prompt, sampling_params
from kvlm.server.protocol import CompletionRequest
from kvlm.server.responses import (
    CompletionChoice,
    CompletionResponse,
    Usage,
    completion_logprobs,
    new_id,
    now,
)
from kvlm.server.serving import (
    SSE_DONE,
    ServingContext,
    collect,
    guarded_events,
    sse,
    submit,
)


async def create_completion(
    ctx: ServingContext, body: CompletionRequest, client: Request
) -> Response:
    timer = ctx.metrics.timer()  # latencies count from the request's arrival
    check_model(body.model, ctx.model_name)
    tokenizer = ctx.engine.tokenizer
    prompt = completion_prompt(body, tokenizer)
    params = sampling_params(
        body,
        max_tokens=body.max_tokens,
        max_tokens_param="max_tokens",
        logprobs=body.logprobs,
        num_prompt_tokens=len(prompt.token_ids),
        max_model_len=ctx.engine.max_model_len,
    )
    request_id = new_id("cmpl")
    stream = await submit(ctx, prompt, params, request_id, body.cache_salt, "prompt")
    if body.stream:
        events = _events(ctx, body, stream, timer)
        return StreamingResponse(guarded_events(events, stream), media_type="text/event-stream")
    final = await collect(stream, client, timer)
    completion = final.outputs[0]
    logprobs = None
    if completion.logprobs is not None:
        logprobs = completion_logprobs(tokenizer, completion.token_ids, completion.logprobs, 0)
    response = CompletionResponse(
        id=request_id,
        created=now(),
        model=ctx.model_name,
        choices=[
            CompletionChoice(
                text=completion.text,
                logprobs=logprobs,
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
            )
        ],
        usage=Usage.of(final),
    )
    return JSONResponse(response.model_dump(mode="json"))


async def _events(
    ctx: ServingContext, body: CompletionRequest, stream: RequestStream, timer: RequestTimer
) -> AsyncGenerator[str, None]:
    tokenizer = ctx.engine.tokenizer
    header = {"id": stream.request_id, "created": now(), "model": ctx.model_name}
    num_sent = 0  # tokens whose log-probabilities went out
    text_offset = 0
    last = None
    async for output in stream:
        last, completion = output, output.outputs[0]
        timer.on_output(len(completion.token_ids), completion.finish_reason)
        if not completion.delta and completion.finish_reason is None:
            continue  # nothing to show yet (a partial character or a possible stop string)
        logprobs = None
        if completion.logprobs is not None:
            logprobs = completion_logprobs(
                tokenizer,
                completion.token_ids[num_sent:],
                completion.logprobs[num_sent:],
                text_offset,
            )
            text_offset += sum(len(t) for t in logprobs.tokens)
        num_sent = len(completion.token_ids)
        choice = CompletionChoice(
            text=completion.delta,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        yield sse(CompletionResponse(**header, choices=[choice]))
    if body.include_usage and last is not None:
        yield sse(CompletionResponse(**header, choices=[], usage=Usage.of(last)))
    yield SSE_DONE
