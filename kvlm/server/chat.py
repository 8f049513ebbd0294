"""`POST /v1/chat/completions`: a conversation through the model's chat template -> a reply."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvlm.engine.async_engine import RequestStream
from kvlm.server.errors import APIError
from kvlm.server.metrics import RequestTimer
from kvlm.server.params import chat_prompt, check_model, sampling_params
from kvlm.server.protocol import ChatCompletionRequest
from kvlm.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    Usage,
    chat_logprobs,
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


async def create_chat_completion(
    ctx: ServingContext, body: ChatCompletionRequest, client: Request
) -> Response:
    timer = ctx.metrics.timer()  # latencies count from the request's arrival
    check_model(body.model, ctx.model_name)
    tokenizer = ctx.engine.tokenizer
    prompt = chat_prompt(body, tokenizer)
    if body.max_completion_tokens is not None:
        max_tokens, max_tokens_param = body.max_completion_tokens, "max_completion_tokens"
    else:  # unset: until the context is full, as vLLM does
        max_tokens, max_tokens_param = body.max_tokens, "max_tokens"
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
    params = sampling_params(
        body,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        num_prompt_tokens=len(prompt.token_ids),
        max_model_len=ctx.engine.max_model_len,
    )
    request_id = new_id("chatcmpl")
    stream = await submit(ctx, prompt, params, request_id, body.cache_salt, "messages")
    if body.stream:
        events = _events(ctx, body, stream, timer)
        return StreamingResponse(guarded_events(events, stream), media_type="text/event-stream")
    final = await collect(stream, client, timer)
    completion = final.outputs[0]
    logprobs = None
    if completion.logprobs is not None:
        logprobs = chat_logprobs(
            tokenizer, completion.token_ids, completion.logprobs, body.top_logprobs or 0
        )
    response = ChatCompletionResponse(
        id=request_id,
        created=now(),
        model=ctx.model_name,
        choices=[
            ChatChoice(
                message=ChatMessageOut(content=completion.text),
                logprobs=logprobs,
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
            )
        ],
        usage=Usage.of(final),
    )
    return JSONResponse(response.model_dump(mode="json"))


async def _events(
    ctx: ServingContext, body: ChatCompletionRequest, stream: RequestStream, timer: RequestTimer
) -> AsyncGenerator[str, None]:
    tokenizer = ctx.engine.tokenizer
    header = {"id": stream.request_id, "created": now(), "model": ctx.model_name}
    first = ChatChunkChoice(delta={"role": "assistant", "content": ""})
    yield sse(ChatCompletionChunk(**header, choices=[first]))
    num_sent = 0  # tokens whose log-probabilities went out
    last = None
    async for output in stream:
        last, completion = output, output.outputs[0]
        timer.on_output(len(completion.token_ids), completion.finish_reason)
        if not completion.delta and completion.finish_reason is None:
            continue  # nothing to show yet (a partial character or a possible stop string)
        logprobs = None
        if completion.logprobs is not None:
            logprobs = chat_logprobs(
                tokenizer,
                completion.token_ids[num_sent:],
                completion.logprobs[num_sent:],
                body.top_logprobs or 0,
            )
        num_sent = len(completion.token_ids)
        choice = ChatChunkChoice(
            delta={"content": completion.delta} if completion.delta else {},
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        yield sse(ChatCompletionChunk(**header, choices=[choice]))
    if body.include_usage and last is not None:
        yield sse(ChatCompletionChunk(**header, choices=[], usage=Usage.of(last)))
    yield SSE_DONE
