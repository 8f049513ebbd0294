"""n > 1 and best_of: one request, several sequences sharing its prompt's K/V blocks.

The request's first sequence (index 0, under the request's own id) prefills the prompt alone.
In the step that computes the prompt's last token the others fork it through the cache's door
(every prompt block held by reference, the partial last one copied on first write) and all
sample their first token from that one row of logits, each with its own generator (seed +
index), so a sequence's tokens never depend on the batch it ran in. From then on they are
ordinary running requests (batched, preempted and recomputed like any other).

Their per-step outputs are merged into the request's: one `CompletionOutput` per sequence,
with its index. With `best_of` above `n`, the whole sequences are kept until the last one
finishes, then the n with the highest cumulative log-probability (the sum of their sampled
tokens' log-probabilities, as OpenAI and vLLM rank them) go out, best first, as indices 0..n-1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvlm.engine.request import (
    CompletionOutput,
    OutputAccumulator,
    Request,
    RequestMetrics,
    RequestOutput,
)
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.sampling import SamplingParams

_SEED_MODULUS = 2**64  # a generator's seed is 64 bits: seed + index wraps around

# Forks a running request into a new one under the given parameters (`LLMEngine`'s).
ForkSequence = Callable[[Request, SamplingParams], Request]


def sequence_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence `index`'s own parameters: one sequence, seeded seed + index; with best_of
    above n, the sampled tokens' log-probabilities are kept to rank the sequences by."""
    seed = None if params.seed is None else (params.seed + index) % _SEED_MODULUS
    logprobs = params.logprobs
    if ranks(params) and logprobs is None:
        logprobs = 0
    return dataclasses.replace(params, n=1, best_of=None, seed=seed, logprobs=logprobs)


def ranks(params: SamplingParams) -> bool:
    """True when only the best n of more sequences are returned (best_of > n)."""
    return params.num_sequences > params.n


def cumulative_logprob(completion: CompletionOutput) -> float:
    """The sum of the sampled tokens' log-probabilities (the completion carries them all)."""
    assert completion.logprobs is not None, "a ranked sequence keeps its logprobs"
    entries = zip(completion.token_ids, completion.logprobs, strict=True)
    return sum(entry[token_id].logprob for token_id, entry in entries)


@dataclass
class SequenceGroup:
    """The sequences of one request, by index; only the first until its prompt is computed."""

    request_id: str
    params: SamplingParams  # as the user gave them (n, best_of, seed)
    sequences: list[Request]
    kv_peak_bytes: int = 0  # the most bytes its sequences held at once, shared blocks once
    metrics: dict[int, RequestMetrics] = field(default_factory=dict)  # latest, per index
    num_finished: int = 0
    results: OutputAccumulator = field(default_factory=OutputAccumulator)  # best_of only

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.num_sequences

    def merged_metrics(self) -> RequestMetrics:
        """The request's metrics: the prompt's, every sequence's tokens and preemptions, the
        first token of any sequence, the finish of the last, and the shared KV peak."""
        all_metrics = list(self.metrics.values())
        first_times = [m.first_token_time for m in all_metrics if m.first_token_time is not None]
        finish_times = [m.finish_time for m in all_metrics if m.finish_time is not None]
        return dataclasses.replace(
            self.metrics[0],
            first_token_time=min(first_times, default=None),
            finish_time=max(finish_times) if self.finished else None,
            num_generated_tokens=sum(m.num_generated_tokens for m in all_metrics),
            num_preemptions=sum(m.num_preemptions for m in all_metrics),
            kv_peak_bytes=self.kv_peak_bytes,
        )


class ParallelSampling:
    """The engine's requests with more than one sequence: forks them, tracks their shared KV
    peak and merges their outputs. Requests with one sequence never enter here."""

    def __init__(self) -> None:
        self.groups: dict[str, SequenceGroup] = {}  # by request id
        self._waiting_fork: dict[str, SequenceGroup] = {}  # prompts not yet computed
        self._sequences: dict[str, tuple[SequenceGroup, int]] = {}  # sequence id -> index

    def add(self, request: Request, params: SamplingParams) -> None:
        """Track `request` (sequence 0, under `sequence_params(params, 0)`) as the first of
        `params.num_sequences`."""
        assert params.num_sequences > 1, "a request with one sequence needs no group"
        group = SequenceGroup(request.request_id, params, [request])
        self.groups[request.request_id] = group
        self._waiting_fork[request.request_id] = group
        self._sequences[request.request_id] = (group, 0)

    def fork_prompts(
        self, logits: torch.Tensor, requests: list[Request], fork: ForkSequence
    ) -> tuple[torch.Tensor, list[Request]]:
        """Before sampling: the requests whose prompt this step computed fork their other
        sequences, each sampling from a copy of the prompt's logits row right after it.
        `logits` holds 1 + len(spec_token_ids) rows per request; returns them with the rows
        and sequences added."""
        if not self._waiting_fork:
            return logits, requests
        rows: list[int] = []
        sequences: list[Request] = []
        row = 0
        for request in requests:
            num_rows = 1 + len(request.spec_token_ids)
            rows += range(row, row + num_rows)
            sequences.append(request)
            group = self._waiting_fork.pop(request.request_id, None)
            if group is not None:
                assert num_rows == 1, "a prompt's last row carries no drafts"
                group.kv_peak_bytes = request.metrics.kv_peak_bytes
                for index in range(1, group.params.num_sequences):
                    child = fork(request, sequence_params(group.params, index))
                    group.sequences.append(child)
                    self._sequences[child.request_id] = (group, index)
                    rows.append(row)
                    sequences.append(child)
            row += num_rows
        return logits[rows], sequences

    def note_kv(self, cache: KVCacheManager) -> None:
        """After scheduling (the step's blocks allocated and copied): each forked request's
        KV peak, its sequences' blocks counted once however many hold them."""
        for group in self.groups.values():
            if len(group.sequences) > 1:
                held = cache.bytes_held_together([s.request_id for s in group.sequences])
                group.kv_peak_bytes = max(group.kv_peak_bytes, held)

    def merge(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The step's outputs with each group's sequences merged into one output of the
        request (where its first sequence's output was); a ranking group's only when all its
        sequences have finished. Other requests' outputs pass as they are."""
        merged: list[RequestOutput | SequenceGroup] = []
        pieces: dict[str, list[tuple[int, RequestOutput]]] = {}
        for output in outputs:
            entry = self._sequences.get(output.request_id)
            if entry is None:
                merged.append(output)
                continue
            group, index = entry
            if group.request_id not in pieces:
                pieces[group.request_id] = []
                merged.append(group)
            pieces[group.request_id].append((index, output))
        result = []
        for item in merged:
            if isinstance(item, RequestOutput):
                result.append(item)
                continue
            output = self._group_output(item, sorted(pieces[item.request_id]))
            if output is not None:
                result.append(output)
        return result

    def remove(self, request_id: str) -> list[str]:
        """Forget the request (aborted); returns the ids of its other unfinished sequences,
        which the caller aborts too. [] for a request with one sequence."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return []
        self._forget(group)
        return [s.request_id for s in group.sequences[1:] if not s.finished]

    def _group_output(
        self, group: SequenceGroup, pieces: list[tuple[int, RequestOutput]]
    ) -> RequestOutput | None:
        completions = []
        for index, output in pieces:
            group.metrics[index] = output.metrics
            group.num_finished += output.finished
            completions.append(dataclasses.replace(output.outputs[0], index=index))
        first = pieces[0][1]
        prompt_logprobs = pieces[0][1].prompt_logprobs if pieces[0][0] == 0 else None
        output = dataclasses.replace(
            first,
            request_id=group.request_id,
            outputs=completions,
            finished=group.finished,
            metrics=group.merged_metrics(),
            prompt_logprobs=prompt_logprobs,
        )
        if group.finished:
            self.groups.pop(group.request_id)
            self._forget(group)
        if not ranks(group.params):
            return output
        group.results.add(output)
        return self._best(group) if group.finished else None

    def _best(self, group: SequenceGroup) -> RequestOutput:
        """The n sequences of highest cumulative log-probability, best first, as 0..n-1."""
        whole = group.results.build()
        scored = sorted(whole.outputs, key=lambda c: (-cumulative_logprob(c), c.index))
        keep_logprobs = group.params.logprobs is not None
        best = [
            dataclasses.replace(
                c,
                index=rank,
                cumulative_logprob=cumulative_logprob(c),
                logprobs=c.logprobs if keep_logprobs else None,
            )
            for rank, c in enumerate(scored[: group.params.n])
        ]
        return dataclasses.replace(whole, outputs=best)

    def _forget(self, group: SequenceGroup) -> None:
        self._waiting_fork.pop(group.request_id, None)
        for sequence in group.sequences:
            self._sequences.pop(sequence.request_id, None)
