"""One request's state as it moves through the engine, and the outputs handed back to users."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvlm.sampling import Logprob, SamplingParams, StopChecker

if TYPE_CHECKING:
    from kvlm.tokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    first_token_time: float | None = None
    finish_time: float | None = None
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    # The most KV bytes (all layer groups, scales included) the request's tables held at once.
    kv_peak_bytes: int = 0

    @property
    def ttft_s(self) -> float | None:
        """Time from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first one (the decode phase alone)."""
        if self.finish_time is None or self.first_token_time is None:
            return None
        elapsed = self.finish_time - self.first_token_time
        if self.num_generated_tokens < 2 or elapsed <= 0:
            return None
        return (self.num_generated_tokens - 1) / elapsed


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    delta: str = ""  # text new since the previous output of this request (for streaming)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


@dataclass
class Request:
    """A prompt plus everything generated so far. `token_ids` holds both, prompt first.

    `num_computed_tokens` counts the leading tokens whose K/V are in the cache; the engine
    computes the rest. Only a request whose computed tokens reach the end samples a new one.
    """

    request_id: str
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    cache_salt: str | None = None
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    num_emitted_chars: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    metrics: RequestMetrics = field(init=False)
    stop_checker: StopChecker = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        self.metrics = RequestMetrics(time.perf_counter(), self.num_prompt_tokens)
        self.stop_checker = StopChecker.from_params(self.params)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def to_output(self) -> RequestOutput:
        """Snapshot for the user; `delta` is text not emitted before (minus stop holdback)."""
        visible = len(self.text)
        if not self.finished:
            visible -= self.stop_checker.holdback(self.text)
        delta = self.text[self.num_emitted_chars : visible]
        self.num_emitted_chars = max(self.num_emitted_chars, visible)
        completion = CompletionOutput(
            index=0,
            text=self.text[:visible],
            token_ids=list(self.output_token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            delta=delta,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.token_ids[: self.num_prompt_tokens],
            outputs=[completion],
            finished=self.finished,
            metrics=dataclasses.replace(self.metrics),  # a snapshot: the engine keeps updating
        )
