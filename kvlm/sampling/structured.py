"""Constrained decoding inside the engine loop: one llguidance matcher per constrained request,
its next-token mask computed on a worker thread while the engine does other work, applied to
that request's logits row only.

The step, for the constrained rows (unconstrained rows are never touched or copied):
  1. `masks(grammars)` waits for each row's mask (normally computed already) and returns one
     `RowMask` the sampler applies in place;
  2. `advance(grammar, token)` feeds the sampled token to the matcher; True when the grammar
     is complete (nothing but end-of-sequence could follow), and the request stops there;
  3. `prefetch(grammars)` queues the next masks of the requests still running on the worker
     thread (llguidance drops the GIL while it walks the token trie). Where a core is spare
     (`spare_core()`: the process may run on more cores than torch's threads take), the
     worker computes them while the engine returns its outputs and runs the next forward.
     Where torch's threads already take every core (2 threads on the project's 2-core
     machines), a third busy thread during the forward stalls its OpenMP barriers for more
     than the masks cost, so the worker runs only during the engine's host work between two
     forwards (outputs, detokenizing, scheduling, the next step's inputs), when torch's
     threads are idle: `before_forward()` waits for it before the next forward starts
     (`overlap`, chosen once at start and logged).

A request's matcher has consumed exactly its generated tokens: preemption keeps those tokens
(the scheduler recomputes their K/V only), so the matcher and its pending mask stay valid;
prefix caching changes no token. A mask is computed before its row is sampled and the matcher
only advances after that, so the worker and the engine thread never touch one matcher at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch

from kvlm.sampling.sampler import RowMask
from kvlm.sampling.structured_grammar import GrammarCompiler, compute_banned
from kvlm.sampling.structured_params import StructuredOutputsParams

log = logging.getLogger(__name__)


def spare_core() -> bool:
    """True when the process may run on more cores than torch's intra-op threads take."""
    return len(os.sched_getaffinity(0)) > torch.get_num_threads()


@dataclass
class RequestGrammar:
    """One request's matcher and where its next mask is: row `row` of `pending`'s result
    (None between `advance` and `prefetch`)."""

    matcher: llguidance.LLMatcher
    pending: Future[torch.Tensor] | None
    row: int = 0


class StructuredDecoder:
    """The engine's constrained decoding: compiles constraints, owns the mask worker."""

    def __init__(
        self,
        make_tokenizer: Callable[[], llguidance.LLTokenizer],
        vocab_size: int,
        overlap: bool | None = None,  # masks computed through the forward; None: spare_core()
    ) -> None:
        self.compiler = GrammarCompiler(make_tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.overlap = spare_core() if overlap is None else overlap
        self._worker: ThreadPoolExecutor | None = None  # started with the first grammar
        self._job: Future[torch.Tensor] | None = None  # the latest prefetch
        self._announced = False  # the mode is logged at the first prefetch

    def start(self, spec: StructuredOutputsParams) -> RequestGrammar:
        """A matcher at the start of `spec`'s grammar, its first mask ready (computed when
        the grammar was compiled); StructuredOutputsError when `spec` cannot be used."""
        compiled = self.compiler.compile(spec)
        first: Future[torch.Tensor] = Future()
        first.set_result(compiled.first_banned.unsqueeze(0))  # [1, vocab_size]
        return RequestGrammar(compiled.matcher.deep_copy(), first)

    def masks(self, grammars: Sequence[RequestGrammar | None]) -> RowMask | None:
        """The mask of each constrained row (None when no row is constrained)."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        parts = []
        for i in rows:
            grammar = grammars[i]
            assert grammar is not None and grammar.pending is not None, "advanced, not prefetched"
            parts.append((grammar.pending.result(), grammar.row))
        first, _ = parts[0]
        if len(parts) == first.shape[0] and all(
            t is first and r == n for n, (t, r) in enumerate(parts)
        ):
            banned = first  # the rows of one prefetch, in order: the common decode step
        else:
            banned = torch.stack([t[r] for t, r in parts])
        return RowMask(rows, banned)

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
        """Start computing the next mask of each grammar (advanced this step), in one job."""
        if not grammars:
            return
        matchers = [g.matcher for g in grammars]
        if not self._announced:
            where = "through the forward" if self.overlap else "between forwards"
            log.info("structured outputs: next-token masks computed on a worker %s", where)
            self._announced = True
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvlm-grammar")
        job = self._worker.submit(compute_banned, matchers, self.vocab_size)
        for row, grammar in enumerate(grammars):
            grammar.pending, grammar.row = job, row
        self._job = job

    def before_forward(self) -> None:
        """Called by the engine before each forward: without a spare core, waits for the
        latest prefetch, so that the worker never competes with torch's threads."""
        if self._job is not None and not self.overlap:
            self._job.result()
        self._job = None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
