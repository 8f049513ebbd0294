"""Speculative decoding with n-gram prompt lookup: drafts from the request's own tokens, one
forward to verify them, rejected drafts' K/V rolled back.

Each step, `propose` gives a decoding request up to `num_tokens` drafts (`Request.spec_token_ids`):
the tokens that followed the latest earlier occurrence of its last n-gram (n from
`prompt_lookup_max` down to `prompt_lookup_min`), looked up in an index of its prompt and output
kept per request and extended by the new tokens only. The runner computes the drafts beside
the last sampled token and returns the target's distribution after each; `verify` keeps the
drafts the target accepts, plus one token of its own, through the request's sampling rules
(`Sampler.adjusted_logits`, `sampling_logits`): greedy, while the target's argmax equals the
draft; sampled, by rejection sampling (Leviathan et al. 2023): an n-gram draft is one token
for sure (q one-hot), so draft x is kept with probability p(x), and on rejection the token is
drawn from the residual max(0, p - q), renormalised (p without x). Greedy output is the
output without speculation; sampled output follows the same distribution. The engine then
rolls the cache back to the verified tokens (`Scheduler.roll_back`); the scheduler names and
windows only verified tokens' blocks, so no block with a draft in it is ever a prefix hit.

No drafts for requests with a grammar (structured outputs: the matcher is not rolled back) or
scoring their prompt (`prompt_logprobs`), nor while a request backs off: when its running
acceptance rate falls below `backoff_acceptance` it proposes nothing for 1, 2, 4 ... 64 steps,
so text with nothing to look up decodes one token per step as without speculation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch

from kvlm.engine.request import Request, RequestStatus
from kvlm.kernels.reduce import argmax_rows
from kvlm.sampling import Logprob, Sampler
from kvlm.sampling.sampler import gather_logprobs, race, sampling_logits

METHODS = ("ngram",)
_MAX_BACKOFF_STEPS = 64
_ALIASES = {"num_speculative_tokens": "num_tokens"}  # vLLM's speculative_config name


class SpeculativeConfigError(ValueError):
    """A speculative-decoding setting is invalid; the message says what to change."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_tokens: int = 4  # k: drafts proposed per step at most
    prompt_lookup_min: int = 2  # shortest n-gram matched
    prompt_lookup_max: int = 4  # longest n-gram matched (tried first)
    # A request whose running acceptance rate of drafts falls below this proposes nothing
    # for a while (doubling each time, up to 64 steps).
    backoff_acceptance: float = 0.3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpeculativeConfigError(
                f"unknown speculative method {self.method!r}; kvlm has {', '.join(METHODS)}"
            )
        for name in ("num_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpeculativeConfigError(
                    f"speculative {name} must be an int >= 1, got {value!r}"
                )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise SpeculativeConfigError(
                f"speculative prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        backoff = self.backoff_acceptance
        if (
            isinstance(backoff, bool)
            or not isinstance(backoff, (int, float))
            or not 0 <= backoff < 1
        ):
            raise SpeculativeConfigError(
                f"speculative backoff_acceptance must be in [0, 1), got {self.backoff_acceptance}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> SpeculativeConfig:
        """From a dict shaped like vLLM's speculative_config (`num_speculative_tokens` is
        taken for `num_tokens`); unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        args = {}
        for key, value in values.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                raise SpeculativeConfigError(
                    f"unknown speculative setting {key!r}; known: {', '.join(sorted(known))}"
                )
            if name in args:
                raise SpeculativeConfigError(f"speculative {name} given twice (as {key!r})")
            args[name] = value
        return cls(**args)


class NgramIndex:
    """Where each n-gram (min_n <= n <= max_n) of one request's tokens last ended.

    `lookup` first adds the n-grams that end before the last token and were not indexed yet
    (a step's new tokens only), so the last n-gram is matched against earlier ones alone."""

    def __init__(self, min_n: int, max_n: int, first: int = 0) -> None:
        self.sizes = range(max_n, min_n - 1, -1)  # longest first
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.first = first  # tokens before it (a virtual prefix's placeholders) are skipped
        self.num_indexed = first  # n-grams ending at or before this position are indexed

    def lookup(self, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` tokens that followed the latest earlier occurrence of the
        longest matching last n-gram of `token_ids`; [] when none occurs earlier."""
        end = len(token_ids)
        if end - 1 < self.num_indexed:
            raise ValueError(f"token ids shrank from {self.num_indexed + 1} to {end}")
        for stop in range(self.num_indexed + 1, end):  # n-grams token_ids[stop - n : stop]
            for n in self.sizes:
                if stop - n >= self.first:
                    self.ends[n][tuple(token_ids[stop - n : stop])] = stop
        self.num_indexed = max(self.num_indexed, end - 1)
        for n in self.sizes:
            if end - n < self.first:
                continue
            found = self.ends[n].get(tuple(token_ids[end - n :]))
            if found is not None:
                return list(token_ids[found : found + num_tokens])
        return []


@dataclass
class _Backoff:
    """A request's running acceptance rate and how long it proposes nothing."""

    acceptance: float = 1.0  # exponentially weighted, halving the weight of older steps
    num_skip: int = 0  # steps left without drafts
    next_skip: int = 1

    def record(self, num_drafts: int, num_accepted: int, threshold: float) -> None:
        rate = num_accepted / num_drafts
        self.acceptance = 0.5 * self.acceptance + 0.5 * rate
        if self.acceptance < threshold:
            self.num_skip, self.acceptance = self.next_skip, threshold
            self.next_skip = min(2 * self.next_skip, _MAX_BACKOFF_STEPS)
        elif rate >= threshold:
            self.next_skip = 1


@dataclass
class _RequestState:
    index: NgramIndex
    backoff: _Backoff = field(default_factory=_Backoff)


@dataclass
class SpeculativeStats:
    """Counters since start, over the requests' sampling steps while speculation is on."""

    num_steps: int = 0  # request-steps that sampled (with drafts or not)
    num_tokens: int = 0  # tokens those steps produced (accepted drafts + one each)
    num_drafts: int = 0  # request-steps that verified drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return self.num_tokens / self.num_steps if self.num_steps else 0.0


@dataclass
class Verified:
    """One step's verification: what is left for the ordinary sampler, and per request with
    drafts the tokens it keeps (accepted drafts, then the target's own) with their logprobs."""

    logits: torch.Tensor  # [num plain requests, vocab] rows of requests without drafts
    plain: list[Request]
    accepted: list[tuple[Request, list[int], list[dict[int, Logprob] | None]]]


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, sampler: Sampler) -> None:
        self.config = config
        self.sampler = sampler
        self.stats = SpeculativeStats()
        self._states: dict[str, _RequestState] = {}

    def propose(self, running: Sequence[Request], max_model_len: int | None) -> None:
        """Set every running request's drafts (none where it takes none); forget requests no
        longer running. `max_model_len`: the longest sequence allowed (None: unbounded)."""
        cfg = self.config
        states = {}
        for request in running:
            state = self._states.get(request.request_id)
            if state is None:
                index = NgramIndex(
                    cfg.prompt_lookup_min, cfg.prompt_lookup_max, request.num_virtual_tokens
                )
                state = _RequestState(index)
            states[request.request_id] = state
            request.spec_token_ids = []
            room = _room(request, cfg.num_tokens, max_model_len)
            if room == 0:
                continue
            if state.backoff.num_skip > 0:
                state.backoff.num_skip -= 1
                continue
            request.spec_token_ids = state.index.lookup(request.token_ids, room)
        self._states = states

    def verify(self, logits: torch.Tensor, requests: Sequence[Request]) -> Verified:
        """Split the step's logits rows (`ModelRunner.run`: 1 + len(drafts) per request, in
        order) into plain rows and verified drafts; clears every request's drafts."""
        plain_rows, plain, accepted = [], [], []
        row = 0
        for request in requests:
            drafts = request.spec_token_ids
            self.stats.num_steps += 1
            if not drafts:
                plain_rows.append(row)
                plain.append(request)
                self.stats.num_tokens += 1
                row += 1
                continue
            rows = logits[row : row + 1 + len(drafts)]
            row += 1 + len(drafts)
            token_ids = verify_drafts(rows, request, self.sampler)
            logprobs: list[dict[int, Logprob] | None] = [None] * len(token_ids)
            if request.params.logprobs is not None:
                num_top = [request.params.logprobs] * len(token_ids)
                chosen = torch.tensor(token_ids, device=rows.device)
                logprobs = gather_logprobs(rows[: len(token_ids)].float(), chosen, num_top)
            num_accepted = len(token_ids) - 1
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += len(drafts)
            self.stats.num_accepted_tokens += num_accepted
            self.stats.num_tokens += len(token_ids)
            state = self._states.get(request.request_id)
            if state is not None:
                state.backoff.record(len(drafts), num_accepted, self.config.backoff_acceptance)
            request.spec_token_ids = []
            accepted.append((request, token_ids, logprobs))
        assert row == logits.shape[0], f"{logits.shape[0]} logits rows for {row} expected"
        index = torch.tensor(plain_rows, dtype=torch.long, device=logits.device)
        return Verified(logits.index_select(0, index), plain, accepted)


def _room(request: Request, num_tokens: int, max_model_len: int | None) -> int:
    """How many drafts the request may take now: 0 unless it decodes (only its last token
    uncomputed) without a grammar or prompt scoring; no more than its max_tokens and the
    context leave after the target's own token."""
    params = request.params
    decoding = request.num_computed_tokens == len(request.token_ids) - 1
    if request.status != RequestStatus.RUNNING or not decoding:
        return 0
    if request.grammar is not None or params.prompt_logprobs is not None:
        return 0
    room = num_tokens
    if params.max_tokens is not None:
        room = min(room, params.max_tokens - request.num_output_tokens - 1)
    if max_model_len is not None:
        room = min(room, max_model_len - len(request.token_ids) - 1)
    return max(room, 0)


def verify_drafts(logits: torch.Tensor, request: Request, sampler: Sampler) -> list[int]:
    """The tokens a request keeps from one verified step: its accepted drafts, then one token
    of the target's (the bonus). `logits` ([1 + k, vocab]): the target's raw distribution after
    the last known token and after each of the k drafts `request.spec_token_ids`; row i is
    judged as if drafts[:i] had been sampled (penalties and min_tokens count them)."""
    drafts, params = request.spec_token_ids, request.params
    num_rows = len(drafts) + 1
    past = request.past_token_ids
    if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        pasts: list[Sequence[int]] = [[*past, *drafts[:i]] for i in range(num_rows)]
    else:
        pasts = [past] * num_rows  # read only under a penalty
    adjusted = sampler.adjusted_logits(
        logits.float(),
        [params] * num_rows,
        pasts,
        [request.num_output_tokens + i for i in range(num_rows)],
    )  # [1 + k, vocab]
    if params.is_greedy:
        targets = argmax_rows(adjusted).tolist()
        num_accepted = 0
        while num_accepted < len(drafts) and targets[num_accepted] == drafts[num_accepted]:
            num_accepted += 1
        return targets[: num_accepted + 1]
    return _rejection_sample(sampling_logits(adjusted, [params] * num_rows), drafts, request)


def _rejection_sample(logits: torch.Tensor, drafts: list[int], request: Request) -> list[int]:
    """Leviathan et al.'s rule for one-hot drafts on sampling logits ([1 + k, vocab])."""
    generator = request.generator
    probs = logits.softmax(dim=-1)  # [1 + k, vocab]
    draft_ids = torch.tensor(drafts, device=logits.device)
    draft_probs = probs[torch.arange(len(drafts), device=logits.device), draft_ids].tolist()
    draws = torch.rand(len(drafts), generator=generator, device=logits.device).tolist()
    for i, (u, p) in enumerate(zip(draws, draft_probs, strict=True)):
        if u < p:
            continue
        residual = logits[i].clone()
        residual[drafts[i]] = float("-inf")  # max(0, p - q) with q one-hot at the draft
        if bool(torch.isinf(residual).all()):  # p(draft) was 1 up to rounding: keep it
            continue
        return [*drafts[:i], int(race(residual[None], [generator])[0])]
    return [*drafts, int(race(logits[-1:], [generator])[0])]
