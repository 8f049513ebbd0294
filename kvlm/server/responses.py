"""Response bodies in OpenAI's shapes: completions, chat completions, their stream chunks.

kvlm's prefix-cache facts ride where OpenAI puts them: `usage.prompt_tokens_details.
cached_tokens` (prompt tokens whose K/V came from the cache); `usage.kv_peak_bytes` (kvlm's
own: the most KV bytes the request held at once, all layer groups, scales included);
`usage.kv_pressed_bytes` (with a `kv_press`: what its tables held right after the press; null
without one).
`stop_reason` (the stop string or token id that ended a choice) is vLLM's extra field.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from kvlm.engine.request import RequestOutput
from kvlm.sampling import Logprob
from kvlm.tokenizer import Tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    kv_peak_bytes: int = 0
    kv_pressed_bytes: int | None = None

    @classmethod
    def of(cls, output: RequestOutput) -> Usage:
        """From any output of the request (a delta too): counts come from its metrics."""
        num_prompt = output.metrics.num_prompt_tokens
        num_completion = output.metrics.num_generated_tokens
        return cls(
            prompt_tokens=num_prompt,
            completion_tokens=num_completion,
            total_tokens=num_prompt + num_completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=output.metrics.num_cached_tokens
            ),
            kv_peak_bytes=output.metrics.kv_peak_bytes,
            kv_pressed_bytes=output.metrics.kv_pressed_bytes,
        )

    @classmethod
    def total(cls, outputs: list[RequestOutput]) -> Usage:
        """Summed over the choices of one request, each counted once (`kv_peak_bytes` too:
        the choices run side by side, so the sum bounds what they held at once;
        `kv_pressed_bytes` over the choices that were pressed, null when none was)."""
        usages = [cls.of(output) for output in outputs]
        pressed = [u.kv_pressed_bytes for u in usages if u.kv_pressed_bytes is not None]
        return cls(
            prompt_tokens=sum(u.prompt_tokens for u in usages),
            completion_tokens=sum(u.completion_tokens for u in usages),
            total_tokens=sum(u.total_tokens for u in usages),
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(u.prompt_tokens_details.cached_tokens for u in usages)
            ),
            kv_peak_bytes=sum(u.kv_peak_bytes for u in usages),
            kv_pressed_bytes=sum(pressed) if pressed else None,
        )

    def without_completion(self) -> Usage:
        """The usage of a prompt scored with nothing generated (echo with max_tokens 0)."""
        return self.model_copy(update={"completion_tokens": 0, "total_tokens": self.prompt_tokens})


# --- log-probabilities -----------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token (with echo the
    prompt's first, whose first token has `null`s: nothing before it to score it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def extend(self, more: CompletionLogprobs) -> CompletionLogprobs:
        """These entries followed by `more`'s (a new object)."""
        return CompletionLogprobs(
            tokens=self.tokens + more.tokens,
            token_logprobs=self.token_logprobs + more.token_logprobs,
            top_logprobs=self.top_logprobs + more.top_logprobs,
            text_offset=self.text_offset + more.text_offset,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


# A token a grammar bans has logprob -inf, which JSON cannot carry: shown as OpenAI and vLLM
# show "impossible".
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _piece(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    entries: Sequence[dict[int, Logprob] | None],
    text_offset: int,
) -> CompletionLogprobs:
    """Log-probabilities of `token_ids` (their own entry plus the top ones) from `entries`;
    a None entry (a prompt's first token) gives `null`s."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        piece = _piece(tokenizer, token_id)
        result.tokens.append(piece)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(_finite(entry[token_id].logprob))
            top = {_piece(tokenizer, t): _finite(lp.logprob) for t, lp in entry.items()}
            result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(piece)
    return result


def chat_logprobs(
    tokenizer: Tokenizer,
    token_ids: list[int],
    entries: list[dict[int, Logprob]],
    num_top: int,
) -> ChatLogprobs:
    """Per token: its log-probability and the `num_top` likeliest alternatives, in order."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        piece = _piece(tokenizer, token_id)
        top = [
            TopLogprob(
                token=(p := _piece(tokenizer, t)), logprob=_finite(lp.logprob), bytes=_bytes(p)
            )
            for t, lp in list(entry.items())[:num_top]  # rank order; the sampled one is last
        ]
        content.append(
            ChatTokenLogprob(
                token=piece,
                logprob=_finite(entry[token_id].logprob),
                bytes=_bytes(piece),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# --- completions -----------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort"] | None
ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"] | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """Also a stream chunk (with `usage` unset, or with `choices` empty for the usage chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- chat completions ------------------------------------------------------------------------


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is tool calls only
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    # {"role": "assistant", "content": ""} first, then {"content": ...} and / or
    # {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# --- errors ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer (see `errors.APIError`)."""

    error: ErrorDetail


# --- models ------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvlm"
    max_model_len: int
    chat_template: str | None  # where it came from: "model files", "built-in gemma", None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
