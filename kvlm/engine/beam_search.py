"""Beam search over forked requests: the beams share the prompt's blocks and their common
ancestors' blocks by reference, and a beam that falls out frees its blocks at once.

The rules are transformers' `generate(num_beams=w, do_sample=False)`: the prompt is prefilled
once and its row gives the first candidates; each step after that takes one decode row per
live beam, in one batch. Per step, the top K = max(2, 1 + number of stop tokens) * w
continuations across all beams (cumulative log-probability) are ranked; those that end (a stop
token, or `max_tokens` reached) become finished hypotheses only if their rank is below w,
scored by sum / (generated tokens) ** length_penalty; the best w that go on are the next
beams. A parent with several surviving continuations is forked (`LLMEngine.fork_request`),
one with none is released. `early_stopping` decides when the search ends (BeamSearchParams).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from kvlm.engine.engine import InputError, LLMEngine
from kvlm.engine.request import Request
from kvlm.sampling import SamplingParams
from kvlm.sampling.beam import BeamSearchParams


@dataclass
class BeamSearchSequence:
    """One finished hypothesis (vLLM's fields): `tokens` holds the prompt and then the
    generated tokens, a final stop token included; `text` is the generated part's text."""

    tokens: list[int]
    cum_logprob: float  # sum of the generated tokens' log-probabilities
    score: float  # cum_logprob / num_generated ** length_penalty: what ranks the sequences
    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens)
    num_prompt_tokens: int

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # beam_width hypotheses, best score first


@dataclass
class _Beam:
    request_id: str
    cum_logprob: torch.Tensor  # [] float32, as transformers accumulates it


@dataclass
class _Hypothesis:
    output_token_ids: list[int]
    cum_logprob: float
    score: torch.Tensor  # [] float32


class BeamSearch:
    """One prompt's beam search, driven by the engine's steps: its requests' rows come to
    `__call__` (`LLMEngine.consume_rows`) and `done` turns True once the search has ended."""

    def __init__(self, engine: LLMEngine, prompt_token_ids: list[int], params: BeamSearchParams):
        self.engine = engine
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.stop_token_ids = frozenset() if params.ignore_eos else engine.stop_token_ids
        self.num_candidates = max(2, 1 + len(self.stop_token_ids)) * params.beam_width
        # The beams' own requests never stop by themselves: ending them is decided here.
        request_params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
        request_id = engine.add_request(None, prompt_token_ids, request_params)
        engine.consume_rows(request_id, self)
        self.beams = [_Beam(request_id, torch.zeros((), dtype=torch.float32))]
        self.finished: list[_Hypothesis] = []  # at most beam_width, best first
        self.num_generated = 0
        self.done = False

    def __call__(self, requests: list[Request], logits: torch.Tensor) -> None:
        """One search step from the live beams' rows ([num_beams, vocab] float32 logits)."""
        index = {r.request_id: i for i, r in enumerate(requests)}
        if set(index) != {b.request_id for b in self.beams}:
            raise RuntimeError(
                f"beam search of width {self.params.beam_width} lost a beam to preemption: the "
                "KV pool cannot hold its beams at once; raise kv_cache_memory"
            )
        rows = logits[[index[b.request_id] for b in self.beams]]
        if self.params.temperature > 0:
            rows = rows / self.params.temperature
        logprobs = torch.log_softmax(rows.float(), dim=-1)  # [num_beams, vocab]
        cum = torch.stack([b.cum_logprob for b in self.beams])  # [num_beams]
        totals = (logprobs + cum[:, None]).flatten()  # [num_beams * vocab]
        top_totals, top_index = torch.topk(totals, self.num_candidates)
        vocab_size = logprobs.shape[1]
        outputs = {r.request_id: r.output_token_ids for r in requests}
        self.num_generated += 1
        at_limit = self.num_generated >= self.params.max_tokens
        width = self.params.beam_width
        going_on: list[tuple[int, int, torch.Tensor]] = []  # (beam, token, cum_logprob)
        all_end = True
        for rank, (total, flat) in enumerate(zip(top_totals, top_index.tolist(), strict=True)):
            beam, token_id = divmod(flat, vocab_size)
            if at_limit or token_id in self.stop_token_ids:
                if rank < width:  # a hypothesis only if it would have been a top-w beam
                    tokens = [*outputs[self.beams[beam].request_id], token_id]
                    score = total / (self.num_generated**self.params.length_penalty)
                    self.finished.append(_Hypothesis(tokens, total.item(), score))
            else:
                all_end = False
                if len(going_on) < width:
                    going_on.append((beam, token_id, total))
        self.finished.sort(key=lambda h: -h.score.item())
        del self.finished[width:]
        assert all_end or len(going_on) == width, "K candidates always leave w to go on"
        self.done = all_end or self._cannot_improve(going_on)
        self._advance([] if self.done else going_on)

    def _cannot_improve(self, going_on: list[tuple[int, int, torch.Tensor]]) -> bool:
        """transformers' end test once beam_width hypotheses are finished: with early_stopping
        True at once, else when the best running beam cannot beat the worst hypothesis."""
        if len(self.finished) < self.params.beam_width:
            return False
        if self.params.early_stopping is True:
            return True
        length, penalty = self.num_generated, self.params.length_penalty
        if self.params.early_stopping == "never" and penalty > 0:
            length = self.params.max_tokens
        best_possible = going_on[0][2] / (length**penalty)
        return bool(best_possible <= self.finished[-1].score)

    def _advance(self, going_on: list[tuple[int, int, torch.Tensor]]) -> None:
        """Release the beams without a continuation, fork those with several, and extend
        each new beam by its token."""
        parents = [b.request_id for b in self.beams]
        continued = {beam for beam, _, _ in going_on}
        for beam, request_id in enumerate(parents):
            if beam not in continued:
                self.engine.abort(request_id)  # its blocks return to the pool now
        self.beams = []
        used: set[int] = set()
        for beam, _, total in going_on:  # every fork before any extension: forks copy tokens
            request_id = parents[beam]
            if beam in used:
                request_id = self.engine.fork_request(parents[beam])
            self.beams.append(_Beam(request_id, total))
            used.add(beam)
        for new_beam, (_, token_id, _) in zip(self.beams, going_on, strict=True):
            self.engine.append_token(new_beam.request_id, token_id)

    def close(self) -> None:
        """Release the live beams' requests (the search failed or was abandoned)."""
        for beam in self.beams:
            self.engine.abort(beam.request_id)
        self.beams = []

    def output(self) -> BeamSearchOutput:
        """The finished hypotheses, best first (call once `done`)."""
        assert self.done, "the search is still running"
        tokenizer = self.engine.tokenizer
        sequences = []
        for h in self.finished:
            ends = h.output_token_ids[-1] in self.stop_token_ids
            sequences.append(
                BeamSearchSequence(
                    tokens=[*self.prompt_token_ids, *h.output_token_ids],
                    cum_logprob=h.cum_logprob,
                    score=h.score.item(),
                    text=tokenizer.decode(h.output_token_ids),
                    finish_reason="stop" if ends else "length",
                    num_prompt_tokens=self.num_prompt_tokens,
                )
            )
        return BeamSearchOutput(sequences)


def beam_search(
    engine: LLMEngine, prompts: list[list[int]], params: BeamSearchParams
) -> list[BeamSearchOutput]:
    """Search every prompt (token ids); one output per prompt, in order. A prompt joins the
    searches already running only when one step holds every beam plus its whole prefill, so no
    beam waits for a row while the others have theirs."""
    config = engine.config
    if engine.speculative is not None:  # drafts would give a beam more than its one row
        raise InputError(
            "beam search cannot run on an engine with speculative decoding: load the model "
            "without speculative= for it"
        )
    capacity = min(config.max_num_seqs, config.max_num_batched_tokens)
    if params.beam_width > capacity:
        raise InputError(
            f"beam_width {params.beam_width} exceeds the beams one step can run ({capacity}: "
            "max_num_seqs and max_num_batched_tokens): lower it or raise those limits"
        )
    for token_ids in prompts:
        if (
            not engine.unbounded_length
            and len(token_ids) + params.max_tokens > engine.max_model_len
        ):
            raise InputError(
                f"prompt has {len(token_ids):,} tokens and max_tokens is {params.max_tokens:,}; "
                f"the context is {engine.max_model_len:,}: shorten either or raise max_model_len"
            )

    def joins(num_searches: int, num_prompt_tokens: int) -> bool:
        num_beams = (num_searches + 1) * params.beam_width
        return (
            num_beams <= config.max_num_seqs
            and num_beams + num_prompt_tokens <= config.max_num_batched_tokens
        )

    waiting = deque(enumerate(prompts))
    running: list[tuple[int, BeamSearch]] = []
    results: dict[int, BeamSearchOutput] = {}
    try:
        while waiting or running:
            while waiting and (not running or joins(len(running), len(waiting[0][1]))):
                i, token_ids = waiting.popleft()
                running.append((i, BeamSearch(engine, token_ids, params)))
            engine.step()
            results.update((i, s.output()) for i, s in running if s.done)
            running = [(i, s) for i, s in running if not s.done]
    finally:
        for _, search in running:
            search.close()
    return [results[i] for i in range(len(prompts))]
