"""One request's state as it moves through the engine, and the outputs handed back to users."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvlm.sampling import Logprob, SamplingParams, StopChecker, StopMatch

if TYPE_CHECKING:
    from kvlm.kv.pinned import VirtualPrefix
    from kvlm.sampling.structured import RequestGrammar
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
    # With a KV press: the KV bytes its tables held right after the (tova: latest) press.
    kv_pressed_bytes: int | None = None

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
    """One completion of a request. In the engine's per-step outputs (the DELTA kind) every
    list and the text hold only what is new since the request's previous output; the
    assembled result (`OutputAccumulator.build`, what `LLM.generate` returns) holds it all."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    # With best_of: the sum of the sampled tokens' log-probabilities it was ranked by.
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]  # the request's own list, shared by its outputs: do not modify
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics  # a snapshot taken when the output was made
    # With `prompt_logprobs` set: per prompt token, its log-probability given the tokens before
    # it plus the top alternatives (None for the first token), in the first output only.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class TextBuffer:
    """Append-only text kept as pieces, joined once when the whole is asked for.

    Reading a short tail or the text after an offset near the end walks pieces from the end,
    so a step's work does not grow with the length of the text.
    """

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self._len += len(piece)

    def tail(self, num_chars: int) -> str:
        """The last `num_chars` characters (fewer when the text is shorter)."""
        return self.text_from(self._len - num_chars) if num_chars > 0 else ""

    def text_from(self, start: int) -> str:
        """text[start:], reading and copying only the pieces it spans."""
        wanted = self._len - max(start, 0)
        if wanted <= 0:
            return ""
        parts, covered = [], 0
        for piece in reversed(self._pieces):
            parts.append(piece)
            covered += len(piece)
            if covered >= wanted:
                break
        parts[-1] = parts[-1][covered - wanted :]  # the earliest piece, cut to the start
        return "".join(reversed(parts))

    def truncate(self, length: int) -> None:
        """Keep the first `length` characters."""
        while self._pieces and self._len - len(self._pieces[-1]) >= length:
            self._len -= len(self._pieces.pop())
        if self._len > length:
            last = self._pieces.pop()
            self._pieces.append(last[: len(last) - (self._len - length)])
            self._len = length

    def text(self) -> str:
        """The whole text (joins the pieces into one)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""


class _CompletionParts:
    """One completion's deltas, joined when the whole is asked for."""

    def __init__(self) -> None:
        self.last: CompletionOutput | None = None
        self.text = TextBuffer()
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.last = delta

    def build(self) -> CompletionOutput:
        assert self.last is not None
        return dataclasses.replace(
            self.last, text=self.text.text(), token_ids=self.token_ids, logprobs=self.logprobs
        )


class OutputAccumulator:
    """Builds a request's full output from its delta outputs, joining each completion's text
    once (a request with n > 1 sends deltas of its completions, each with its index)."""

    def __init__(self) -> None:
        self.last: RequestOutput | None = None
        self._completions: dict[int, _CompletionParts] = {}
        self._prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def add(self, delta: RequestOutput) -> None:
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = (self._prompt_logprobs or []) + delta.prompt_logprobs
        for completion in delta.outputs:
            self._completions.setdefault(completion.index, _CompletionParts()).add(completion)
        self.last = delta

    @property
    def num_token_ids(self) -> int:
        """Token ids received, all completions together."""
        return sum(len(c.token_ids) for c in self._completions.values())

    def build(self) -> RequestOutput:
        """The output as if one snapshot held everything: per completion (by index) its full
        text, ids and logprobs and its latest finish reason; `finished` and metrics of the
        latest delta."""
        if self.last is None:
            raise ValueError("no output was added")
        completions = [self._completions[i].build() for i in sorted(self._completions)]
        return dataclasses.replace(
            self.last, outputs=completions, prompt_logprobs=self._prompt_logprobs
        )


@dataclass
class Request:
    """A prompt plus everything generated so far. `token_ids` holds both, prompt first.

    `num_computed_tokens` counts the leading tokens whose K/V are in the cache; the engine
    computes the rest. Only a request whose computed tokens reach the end samples a new one.
    Text, token ids and logprobs go out once each: `to_output` hands over what is new since
    its previous call (the stop-string holdback excepted, which goes out when safe).

    With a `virtual_prefix` (a prefix-tuning adapter), `token_ids` starts with its placeholder
    ids and `num_computed_tokens` never drops below their count: their K/V are the prefix's
    pinned blocks. `prompt_token_ids` and the metrics count the real prompt only.

    With `params.prompt_logprobs` set the request scores its prompt: the row of each prompt
    token but the last gives the next one's log-probability. `num_prompt_logprobs` counts the
    entries computed so far (the first token's None included), so the rows still needed start
    at `next_scored_row`; the scheduler takes no prefix hit past it, and the runner projects
    every needed row a step computes.
    """

    request_id: str
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    cache_salt: str | None = None
    virtual_prefix: VirtualPrefix | None = None
    # Structured outputs: the matcher that has consumed exactly the generated tokens.
    grammar: RequestGrammar | None = None
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Generated entries not yet handed out by `to_output` (the engine appends to this list).
    logprobs: list[dict[int, Logprob]] | None = None
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    # Prompt entries computed but not yet handed out, and how many were computed in all.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_prompt_logprobs: int = 0
    # Speculative decoding: draft tokens proposed after the last sampled one, computed this
    # step beside it (after `token_ids`, never part of them until verified). The runner feeds
    # `token_ids + spec_token_ids` and returns 1 + len(spec_token_ids) logits rows for a
    # request with drafts: the target's distribution after each of them, in order.
    spec_token_ids: list[int] = field(default_factory=list)
    # KV press (`params.kv_press`): it runs when `num_computed_tokens` reaches `press_at`
    # (first the prompt's end unless set), and chunks stop there until it has; then press_at
    # is None, or for tova the text position where the cache next holds its budget plus a
    # block. A press compacts the cache groups without a window only (engine/press.py), so
    # group g then holds `num_dropped_tokens[g]` fewer tokens than the text (0 in a window
    # group): rope positions stay text positions, store rows and key counts are each group's
    # cache indices (`num_cache_tokens(g)`). A preempted request is recomputed and pressed
    # again.
    press_at: int | None = None
    # `LLM.score_continuations`: the prompt's tokens from here on are a continuation scored
    # after the press (press_at is this, and prompt_logprobs hold its tokens' entries only)
    continuation_start: int | None = None
    # Per cache group, the tokens presses dropped from it; () until a press drops any
    num_dropped_tokens: tuple[int, ...] = ()
    # snapkv, expected_attention, tova: per layer, the queries the pending press reads (times
    # the scale, rotated as `QueryCapture` says) computed so far
    press_queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    prompt_token_ids: list[int] = field(init=False)
    metrics: RequestMetrics = field(init=False)
    stop_checker: StopChecker = field(init=False)
    _text: TextBuffer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.token_ids)
        if self.virtual_prefix is not None:
            self.token_ids = [*self.virtual_prefix.token_ids, *self.token_ids]
        self.num_prompt_tokens = len(self.token_ids)  # outputs start after these
        self.metrics = RequestMetrics(time.perf_counter(), len(self.prompt_token_ids))
        self.stop_checker = StopChecker.from_params(self.params)
        self._text = TextBuffer()
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # nothing before the first prompt token to score it
            self.num_prompt_logprobs = 1
        if self.continuation_start is not None:
            assert self.virtual_prefix is None and 0 < self.continuation_start < len(self.token_ids)
            if self.params.prompt_logprobs is not None:
                self.prompt_logprobs = []  # entries start at the continuation's first token
                self.num_prompt_logprobs = self.continuation_start
        self.press_at = self._first_press_at()

    @property
    def extra_keys(self) -> tuple[str, ...]:
        """What names the request's blocks besides its tokens and salt: its adapter's key."""
        return () if self.virtual_prefix is None else (self.virtual_prefix.hash_key,)

    @property
    def next_scored_row(self) -> int | None:
        """Position of the first prompt row whose logits the request still needs (scoring the
        token after it); None when it needs none (its prompt is scored, or not asked for)."""
        if self.params.prompt_logprobs is None:
            return None
        row = self.num_virtual_tokens + self.num_prompt_logprobs - 1
        return row if row < self.num_prompt_tokens - 1 else None

    def num_cache_tokens(self, group: int) -> int:
        """Tokens whose K/V cache group `group` holds: computed ones less those a press
        dropped from it."""
        dropped = self.num_dropped_tokens[group] if self.num_dropped_tokens else 0
        return self.num_computed_tokens - dropped

    def cache_lengths(self, num_groups: int, num_new_tokens: int = 0) -> list[int]:
        """Per cache group, the tokens it holds once `num_new_tokens` more are computed (what
        the cache manager allocates and copies by)."""
        return [self.num_cache_tokens(g) + num_new_tokens for g in range(num_groups)]

    def _first_press_at(self) -> int | None:
        if self.params.kv_press is None:
            return None
        if self.continuation_start is None:
            return self.num_prompt_tokens
        return self.continuation_start

    @property
    def press_pending(self) -> bool:
        return self.press_at is not None

    @property
    def press_window(self) -> tuple[int, int] | None:
        """[first, end) text positions whose queries the pending press reads
        (`KVPress.query_window`); None: none."""
        press = self.params.kv_press
        if press is None or self.press_at is None:
            return None
        return press.query_window(self.press_at)

    def forget_press(self) -> None:
        """Preempted: the cache is gone, so the press runs again after the recompute."""
        self.press_at = self._first_press_at()
        self.num_dropped_tokens = ()
        self.press_queries.clear()

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.virtual_prefix is None else self.virtual_prefix.num_tokens

    @property
    def past_token_ids(self) -> list[int]:
        """Prompt and generated ids without the virtual prefix (what penalties count)."""
        if self.virtual_prefix is None:
            return self.token_ids
        return self.token_ids[self.virtual_prefix.num_tokens :]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_text(self, piece: str, check_stop: bool = True) -> StopMatch | None:
        """Append newly detokenized text. When it completes a stop string, the text is cut
        where the stop rule says and the match returned; the caller finishes the request.

        Reads only the tail a stop string can span, so a step costs the same at any length.
        """
        context = self._text.tail(self.stop_checker.max_len - 1) if check_stop else ""
        self._text.append(piece)
        if not check_stop or not piece:
            return None
        match = self.stop_checker.check(context + piece, len(piece))
        if match is not None:
            self._text.truncate(len(self._text) - len(context) - len(piece) + match.truncate_at)
        return match

    @property
    def text(self) -> str:
        """All generated text so far (joins the pieces: not for per-step use)."""
        return self._text.text()

    def to_output(self) -> RequestOutput:
        """What is new since the previous call: token ids, logprobs and text (minus a tail
        that may still become a stop string, held back until the request finishes)."""
        visible = len(self._text)
        if not self.finished:
            visible -= self.stop_checker.holdback(self._text.tail(self.stop_checker.max_len - 1))
        delta = ""
        if visible > self.num_emitted_chars:
            delta = self._text.text_from(self.num_emitted_chars)[: visible - self.num_emitted_chars]
            self.num_emitted_chars = visible
        logprobs = None
        if self.logprobs is not None:
            logprobs, self.logprobs = self.logprobs, []
        prompt_logprobs = None
        if self.prompt_logprobs:  # once, with the first output after the prompt is scored
            prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, []
        first_new = self.num_prompt_tokens + self.num_emitted_tokens
        self.num_emitted_tokens = self.num_output_tokens
        completion = CompletionOutput(
            index=0,
            text=delta,
            token_ids=self.token_ids[first_new:],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=logprobs,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[completion],
            finished=self.finished,
            metrics=dataclasses.replace(self.metrics),  # a snapshot: the engine keeps updating
            prompt_logprobs=prompt_logprobs,
        )
