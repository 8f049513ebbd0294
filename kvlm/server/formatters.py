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
from kvlm.server.prompts import Prompt
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
    """Shapes of one request's output: n choices per prompt of `prepared`, prompt-major as
    OpenAI numbers them (`index` = prompt * n + completion). Stateful: a stream's chunks of
    one choice must come in order."""

    def __init__(self, prepared: Prepared, tokenizer: Tokenizer, header: Header) -> None:
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.header = header
        self.n = prepared.params[0].n  # completions per prompt, the same for every prompt
        self.num_choices = len(prepared.prompts) * self.n

    def choices(
        self, finals: list[RequestOutput]
    ) -> list[tuple[int, RequestOutput, CompletionOutput]]:
        """(choice index, its prompt's output, the completion) of every choice, in order."""
        return [
            (i * self.n + c.index, final, c)
            for i, final in enumerate(finals)
            for c in sorted(final.outputs, key=lambda c: c.index)
        ]

    def stream_start(self) -> list[BaseModel]:
        """Chunks to send before the first generated text."""
        return []

    def first_chunks(self, index: int, first: RequestOutput) -> list[BaseModel]:
        """Chunks to send before choice `index`'s first text; `first` is its first output
        (the one that carries the prompt's log-probabilities)."""
        return []

    @abstractmethod
    def chunk(
        self,
        index: int,
        text: str,
        token_ids: list[int],
        logprobs: Logprobs,
        completion: CompletionOutput,
    ) -> BaseModel:
        """One stream chunk of choice `index`: `text` and the tokens not sent before;
        `completion` (the latest delta) gives the finish reason."""

    def usage(self, outputs: list[RequestOutput]) -> Usage:
        """The request's usage from an output of each choice, summed over the choices."""
        return Usage.total(outputs)

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    @abstractmethod
    def response(self, finals: list[RequestOutput]) -> BaseModel:
        """The whole response from each choice's assembled output, in index order."""


class CompletionFormatter(Formatter):
    """`/v1/completions`: `text_completion` objects. With echo, a choice's text starts with its
    prompt, and with logprobs its log-probabilities start with the prompt's (OpenAI's legacy
    shape: `null` for the first token, text offsets into the returned text); a stream sends
    them in the choice's first chunk. `max_tokens: 0` (with echo) returns the prompt only:
    the one token the engine generated for it is dropped (`completion_params`)."""

    def __init__(self, prepared: Prepared, tokenizer: Tokenizer, header: Header) -> None:
        super().__init__(prepared, tokenizer, header)
        body = prepared.body
        assert isinstance(body, CompletionRequest)
        self.prompt_only = body.max_tokens == 0
        self.echo = bool(body.echo)
        echoes = [self._echo(p) if self.echo else "" for p in prepared.prompts]
        self.echoes = [e for e in echoes for _ in range(self.n)]  # per choice
        # characters of each choice's text sent so far, for logprobs' text_offset
        self.text_offsets = [0] * self.num_choices

    def _echo(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    def first_chunks(self, index: int, first: RequestOutput) -> list[BaseModel]:
        if not self.echo:
            return []
        choice = CompletionChoice(
            index=index, text=self.echoes[index], logprobs=self._prompt_logprobs(index, first)
        )
        return [CompletionResponse(**vars(self.header), choices=[choice])]

    def _prompt_logprobs(self, index: int, output: RequestOutput) -> CompletionLogprobs | None:
        """The prompt's entries (with echo and logprobs); text offsets restart at 0, and the
        completion's continue after the echoed text."""
        self.text_offsets[index] = len(self.echoes[index])
        if output.prompt_logprobs is None:
            return None
        return completion_logprobs(
            self.tokenizer, output.prompt_token_ids, output.prompt_logprobs, 0
        )

    def chunk(
        self,
        index: int,
        text: str,
        token_ids: list[int],
        logprobs: Logprobs,
        completion: CompletionOutput,
    ) -> BaseModel:
        choice = self._choice(index, text, token_ids, logprobs, completion)
        return CompletionResponse(**vars(self.header), choices=[choice])

    def _choice(
        self,
        index: int,
        text: str,
        token_ids: list[int],
        logprobs: Logprobs,
        completion: CompletionOutput,
        prompt: CompletionLogprobs | None = None,
    ) -> CompletionChoice:
        """Choice `index` with the generated `text`, after `prompt`'s entries if given."""
        finish_reason, stop_reason = completion.finish_reason, completion.stop_reason
        if self.prompt_only:
            text, token_ids = "", []
            logprobs = None if logprobs is None else []
            finish_reason = None if finish_reason is None else "length"
            stop_reason = None
        entries = None
        if logprobs is not None:
            entries = completion_logprobs(
                self.tokenizer, token_ids, logprobs, self.text_offsets[index]
            )
            self.text_offsets[index] += sum(len(t) for t in entries.tokens)
        if prompt is not None:
            entries = prompt if entries is None else prompt.extend(entries)
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=entries,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )

    def usage(self, outputs: list[RequestOutput]) -> Usage:
        usage = super().usage(outputs)
        return usage.without_completion() if self.prompt_only else usage

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return CompletionResponse(**vars(self.header), choices=[], usage=usage)

    def response(self, finals: list[RequestOutput]) -> BaseModel:
        choices = []
        for index, final, completion in self.choices(finals):
            prompt = self._prompt_logprobs(index, final) if self.echo else None
            choice = self._choice(
                index, completion.text, completion.token_ids, completion.logprobs, completion,
                prompt,
            )  # fmt: skip
            choice.text = self.echoes[index] + choice.text
            choices.append(choice)
        return CompletionResponse(**vars(self.header), choices=choices, usage=self.usage(finals))


class ChatFormatter(Formatter):
    """`/v1/chat/completions`: `chat.completion` and `chat.completion.chunk` objects. With
    tools to call, the text is parsed into content and `tool_calls` (`tool_parser.py`), the
    same way in a stream and in the whole response."""

    def __init__(self, prepared: Prepared, tokenizer: Tokenizer, header: Header) -> None:
        super().__init__(prepared, tokenizer, header)
        assert isinstance(prepared.body, ChatCompletionRequest)
        self.num_top = prepared.body.top_logprobs or 0
        tools = prepared.tools
        parses = tools is not None and tools.parses_calls
        # one per choice: each one's text is parsed on its own
        self.parsers = [ToolCallParser() if parses else None for _ in range(self.num_choices)]

    def stream_start(self) -> list[BaseModel]:
        role = {"role": "assistant", "content": ""}
        return [
            ChatCompletionChunk(**vars(self.header), choices=[ChatChunkChoice(index=i, delta=role)])
            for i in range(self.num_choices)
        ]

    def chunk(
        self,
        index: int,
        text: str,
        token_ids: list[int],
        logprobs: Logprobs,
        completion: CompletionOutput,
    ) -> BaseModel:
        finish_reason: str | None = completion.finish_reason
        delta: dict[str, Any] = {"content": text} if text else {}
        parser = self.parsers[index]
        if parser is not None:
            first = parser.num_calls
            parsed = parser.feed(text)
            if finish_reason is not None:
                rest = parser.finish()
                parsed.content += rest.content
            delta = {"content": parsed.content} if parsed.content else {}
            if parsed.calls:
                delta["tool_calls"] = [c.to_dict(first + k) for k, c in enumerate(parsed.calls)]
            finish_reason = _tool_finish(finish_reason, parser.num_calls)
        choice = ChatChunkChoice(
            index=index,
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

    def response(self, finals: list[RequestOutput]) -> BaseModel:
        choices = [self._whole_choice(i, c) for i, _, c in self.choices(finals)]
        return ChatCompletionResponse(
            **vars(self.header), choices=choices, usage=self.usage(finals)
        )

    def _whole_choice(self, index: int, completion: CompletionOutput) -> ChatChoice:
        message = ChatMessageOut(content=completion.text)
        finish_reason: str | None = completion.finish_reason
        if self.parsers[index] is not None:
            content, calls = parse_all(completion.text)
            message = ChatMessageOut(
                content=content,
                tool_calls=[ToolCall.model_validate(c.to_dict()) for c in calls] or None,
            )
            finish_reason = _tool_finish(finish_reason, len(calls))
        return ChatChoice(
            index=index,
            message=message,
            logprobs=self._logprobs(completion.token_ids, completion.logprobs),
            finish_reason=finish_reason,
            stop_reason=completion.stop_reason,
        )


def _tool_finish(finish_reason: str | None, num_calls: int) -> str | None:
    """OpenAI's "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if finish_reason == "stop" and num_calls else finish_reason
