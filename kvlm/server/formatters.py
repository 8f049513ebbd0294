"""How one generation is written out, per API: the stream's chunks and the whole response.

The driver (`driver.py`) runs the same loop for every route and hands each formatter the new
text, token ids and log-probabilities; the formatter only decides the shapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from kvlm.engine.request import CompletionOutput, RequestOutput
from kvlm.sampling import Logprob
from kvlm.server.params import Prepared
from kvlm.server.protocol import ChatCompletionRequest, CompletionRequest
from kvlm.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ToolCall,
    Usage,
    chat_logprobs,
    completion_logprobs,
)
from kvlm.server.tool_parser import ToolCallParser, parse_all
from kvlm.tokenizer import Tokenizer

Logprobs = list[dict[int, Logprob]] | None  # one entry per token, None when not asked for


@dataclass(frozen=True)
class Header:
    """The fields every chunk and response of one request repeats."""

    id: str
    created: int
    model: str


class Formatter(ABC):
    """Shapes of one request's output. Stateful: a stream's chunks must come in order."""

    def __init__(self, prepared: Prepared, tokenizer: Tokenizer, header: Header) -> None:
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.header = header

    def stream_start(self) -> list[BaseModel]:
        """Chunks to send before the first generated text."""
        return []

    @abstractmethod
    def chunk(
        self,
        text: str,
        token_ids: list[int],
        logprobs: Logprobs,
        completion: CompletionOutput,
    ) -> BaseModel:
        """One stream chunk: `text` and the tokens not sent before; `completion` (the latest
        delta) gives the finish reason."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    @abstractmethod
    def response(self, final: RequestOutput) -> BaseModel:
        """The whole response from the assembled output."""


class CompletionFormatter(Formatter):
    """`/v1/completions`: `text_completion` objects; with echo, the prompt text comes first."""

    def __init__(self, prepared: Prepared, tokenizer: Tokenizer, header: Header) -> None:
        super().__init__(prepared, tokenizer, header)
        assert isinstance(prepared.body, CompletionRequest)
        self.echo = ""
        if prepared.body.echo:
            prompt = prepared.prompt
            self.echo = (
                prompt.text
                if prompt.text is not None
                else tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
            )
        self.text_offset = 0  # characters of completion text sent so far, for logprobs

    def stream_start(self) -> list[BaseModel]:
        if not self.echo:
            return []
        choice = CompletionChoice(text=self.echo)
        return [CompletionResponse(**vars(self.header), choices=[choice])]

    def chunk(
        self, text: str, token_ids: list[int], logprobs: Logprobs, completion: CompletionOutput
    ) -> BaseModel:
        choice = CompletionChoice(
            text=text,
            logprobs=self._logprobs(token_ids, logprobs),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        return CompletionResponse(**vars(self.header), choices=[choice])

    def _logprobs(self, token_ids: list[int], logprobs: Logprobs) -> CompletionLogprobs | None:
        if logprobs is None:
            return None
        result = completion_logprobs(self.tokenizer, token_ids, logprobs, self.text_offset)
        self.text_offset += sum(len(t) for t in result.tokens)
        return result

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return CompletionResponse(**vars(self.header), choices=[], usage=usage)

    def response(self, final: RequestOutput) -> BaseModel:
        completion = final.outputs[0]
        choice = CompletionChoice(
            text=self.echo + completion.text,
            logprobs=self._logprobs(completion.token_ids, completion.logprobs),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        return CompletionResponse(**vars(self.header), choices=[choice], usage=Usage.of(final))


class ChatFormatter(Formatter):
    """`/v1/chat/completions`: `chat.completion` and `chat.completion.chunk` objects. With
    tools to call, the text is parsed into content and `tool_calls` (`tool_parser.py`), the
    same way in a stream and in the whole response."""

    def __init__(self, prepared: Prepared, tokenizer: Tokenizer, header: Header) -> None:
        super().__init__(prepared, tokenizer, header)
        assert isinstance(prepared.body, ChatCompletionRequest)
        self.num_top = prepared.body.top_logprobs or 0
        tools = prepared.tools
        self.parser = ToolCallParser() if tools is not None and tools.parses_calls else None

    def stream_start(self) -> list[BaseModel]:
        first = ChatChunkChoice(delta={"role": "assistant", "content": ""})
        return [ChatCompletionChunk(**vars(self.header), choices=[first])]

    def chunk(
        self, text: str, token_ids: list[int], logprobs: Logprobs, completion: CompletionOutput
    ) -> BaseModel:
        finish_reason: str | None = completion.finish_reason
        delta: dict[str, Any] = {"content": text} if text else {}
        if self.parser is not None:
            first = self.parser.num_calls
            parsed = self.parser.feed(text)
            if finish_reason is not None:
                rest = self.parser.finish()
                parsed.content += rest.content
            delta = {"content": parsed.content} if parsed.content else {}
            if parsed.calls:
                delta["tool_calls"] = [c.to_dict(first + k) for k, c in enumerate(parsed.calls)]
            finish_reason = _tool_finish(finish_reason, self.parser.num_calls)
        choice = ChatChunkChoice(
            delta=delta,
            logprobs=self._logprobs(token_ids, logprobs),
            finish_reason=finish_reason,
            stop_reason=completion.stop_reason,
        )
        return ChatCompletionChunk(**vars(self.header), choices=[choice])

    def _logprobs(self, token_ids: list[int], logprobs: Logprobs) -> ChatLogprobs | None:
        if logprobs is None:
            return None
        return chat_logprobs(self.tokenizer, token_ids, logprobs, self.num_top)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(**vars(self.header), choices=[], usage=usage)

    def response(self, final: RequestOutput) -> BaseModel:
        completion = final.outputs[0]
        message = ChatMessageOut(content=completion.text)
        finish_reason: str | None = completion.finish_reason
        if self.parser is not None:
            content, calls = parse_all(completion.text)
            message = ChatMessageOut(
                content=content,
                tool_calls=[ToolCall.model_validate(c.to_dict()) for c in calls] or None,
            )
            finish_reason = _tool_finish(finish_reason, len(calls))
        choice = ChatChoice(
            message=message,
            logprobs=self._logprobs(completion.token_ids, completion.logprobs),
            finish_reason=finish_reason,
            stop_reason=completion.stop_reason,
        )
        return ChatCompletionResponse(**vars(self.header), choices=[choice], usage=Usage.of(final))


def _tool_finish(finish_reason: str | None, num_calls: int) -> str | None:
    """OpenAI's "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if finish_reason == "stop" and num_calls else finish_reason
