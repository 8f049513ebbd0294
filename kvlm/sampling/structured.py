"""Constrained decoding inside the engine loop: one llguidance matcher per constrained request,
its next-token mask computed on mask worker threads while the engine does other work, applied
to that request's logits row only.

The step, for the constrained rows (unconstrained rows are never touched or copied):
  1. `masks(grammars)` waits for each row's mask (normally computed already) and returns one
     `RowMask` (packed int32 bitmasks, one row per constrained logits row) the sampler applies
     in place;
  2. `advance(grammar, token)` feeds the sampled token to the matcher; True when the grammar
     is complete (nothing but end-of-sequence could follow), and the request stops there;
  3. `prefetch(grammars)` queues the next masks of the requests still running, one job per
     mask lane (`structured_grammar`: a lane's matchers share no lock with another lane's),
     each lane on its own worker thread (llguidance drops the GIL while it walks the token
     trie). Where a core is spare (`spare_cores()`: the process may run on more cores than
     torch's threads take), those cores' workers compute them while the engine returns its
     outputs and runs the next forward. Where torch's threads already take every core (2
     threads on the project's 2-core machines), a busy thread during the forward stalls its
     OpenMP barriers for more than the masks cost, so one worker per core computes them
     during the engine's host work between two forwards (outputs, detokenizing, scheduling,
     the next step's inputs), when torch's threads are idle (`kvlm.openmp`: idle, not
     spinning): `before_forward()` waits for them before the next forward starts (`overlap`,
     chosen once at start and logged).

A request's matcher has consumed exactly its generated tokens: preemption keeps those tokens
(the scheduler recomputes their K/V only), so the matcher and its pending mask stay valid;
prefix caching changes no token. A mask is computed before its row is sampled and the matcher
only advances after that, so a worker and the engine thread never touch one matcher at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch

from kvlm import openmp
from kvlm.sampling.sampler import RowMask
from kvlm.sampling.structured_grammar import GrammarCompiler, fill_mask
from kvlm.sampling.structured_params import StructuredOutputsParams

log = logging.getLogger(__name__)

MAX_LANES = 8  # mask threads (and compiled copies of each constraint) at most


def spare_cores() -> int:
    """Cores the process may run on beyond those torch's intra-op threads take."""
    return max(0, len(os.sched_getaffinity(0)) - torch.get_num_threads())


@dataclass
class RequestGrammar:
    """One request's matcher, on mask lane `lane`, and its next mask: `allowed`
    ([ceil(vocab_size / 32)] int32 bitmask), written once `pending` is done (None between
    `advance` and `prefetch`)."""

    matcher: llguidance.LLMatcher
    lane: int
    allowed: torch.Tensor
    pending: Future[None] | None


def _done() -> Future[None]:
    done: Future[None] = Future()
    done.set_result(None)
    return done


def _fill_masks(grammars: list[RequestGrammar]) -> None:
    for grammar in grammars:
        fill_mask(grammar.matcher, grammar.allowed)


class StructuredDecoder:
    """The engine's constrained decoding: compiles constraints, owns the mask workers."""

    def __init__(
        self,
        make_tokenizer: Callable[[], llguidance.LLTokenizer],
        vocab_size: int,
        overlap: bool | None = None,  # masks computed through the forward; None: spare cores
        num_lanes: int | None = None,  # mask threads; None: the spare cores, else every core
    ) -> None:
        self.compiler = GrammarCompiler(make_tokenizer, vocab_size)
        self.vocab_size = vocab_size
        spare = spare_cores()
        self.overlap = spare > 0 if overlap is None else overlap
        if num_lanes is None:
            cores = spare if self.overlap else len(os.sched_getaffinity(0))
            num_lanes = min(MAX_LANES, max(1, cores))
        if num_lanes < 1:
            raise ValueError(f"num_lanes must be at least 1, got {num_lanes}")
        self.num_lanes = num_lanes
        self._next_lane = 0  # requests take lanes in turn
        self._worker: ThreadPoolExecutor | None = None  # started with the first prefetch
        self._jobs: list[Future[None]] = []  # the latest prefetch, one job per lane
        self._step_masks = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)
        self._announced = False  # the mode is logged at the first prefetch

    def start(self, spec: StructuredOutputsParams) -> RequestGrammar:
        """A matcher at the start of `spec`'s grammar, on the next lane, its first mask ready
        (computed when the grammar was compiled); StructuredOutputsError when `spec` cannot
        be used."""
        lane = self._next_lane
        compiled = self.compiler.compile(spec, lane)
        self._next_lane = (lane + 1) % self.num_lanes
        return RequestGrammar(
            compiled.matcher.deep_copy(), lane, compiled.first_allowed.clone(), _done()
        )

    def masks(self, grammars: Sequence[RequestGrammar | None]) -> RowMask | None:
        """The mask of each constrained row (None when no row is constrained), in a buffer
        this decoder reuses: valid until the next call."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        if self._step_masks.shape[0] < len(rows):
            self._step_masks = self._step_masks.new_empty(len(rows), self._step_masks.shape[1])
        allowed = self._step_masks[: len(rows)]  # [len(rows), words]
        parts = []
        for i in rows:
            grammar = grammars[i]
            assert grammar is not None and grammar.pending is not None, "advanced, not prefetched"
            grammar.pending.result()
            parts.append(grammar.allowed)
        torch.stack(parts, out=allowed)
        return RowMask(rows, allowed)

    def advance(self, grammar: RequestGrammar, token_id: int) -> bool:
        """Feed the sampled token; True when the grammar is complete. A token the mask did
        not allow is a bug, and raised as one."""
        grammar.pending = None
        if not grammar.matcher.consume_token(token_id):
            raise RuntimeError(
                f"token {token_id} broke the grammar it was sampled under: "
                f"{grammar.matcher.get_error()[:300]}"
            )
        return grammar.matcher.is_stopped()

    def prefetch(self, grammars: Sequence[RequestGrammar]) -> None:
        """Start computing the next mask of each grammar (advanced this step): one job per
        lane, each lane's rows in its own job."""
        if not grammars:
            return
        if not self._announced:
            self._announce()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(self.num_lanes, thread_name_prefix="kvlm-grammar")
        lanes: list[list[RequestGrammar]] = [[] for _ in range(self.num_lanes)]
        for grammar in grammars:
            lanes[grammar.lane].append(grammar)
        self._jobs = []
        for mine in lanes:
            if mine:
                job = self._worker.submit(_fill_masks, mine)
                for grammar in mine:
                    grammar.pending = job
                self._jobs.append(job)

    def before_forward(self) -> None:
        """Called by the engine before each forward: without a spare core, waits for the
        latest prefetch, so that no worker competes with torch's threads."""
        if not self.overlap:
            for job in self._jobs:
                job.result()
        self._jobs = []

    def _announce(self) -> None:
        where = "through the forward" if self.overlap else "between forwards"
        log.info(
            "structured outputs: next-token masks computed on %d worker(s) %s",
            self.num_lanes,
            where,
        )
        if not self.overlap and not openmp.IDLE_THREADS_SLEEP:
            log.warning(
                "structured outputs: torch was imported before kvlm, so its idle OpenMP "
                "threads spin about 8 ms after each step and take a core from the mask "
                "workers; import kvlm first or set GOMP_SPINCOUNT=%d",
                openmp.SPIN_COUNT,
            )
        self._announced = True

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
