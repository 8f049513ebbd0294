"""Constrained decoding inside the engine loop: one llguidance matcher per constrained request,
its next-token mask computed off the engine thread while the model runs, applied to that
request's logits row only.

The step, for the constrained rows (unconstrained rows are never touched or copied):
  1. `masks(grammars)` waits for each row's mask (normally computed already, during the
     forward pass) and returns one `RowMask` the sampler applies with one masked_fill;
  2. `advance(grammar, token)` feeds the sampled token to the matcher; True when the grammar
     is complete (nothing but end-of-sequence could follow), and the request stops there;
  3. `prefetch(grammars)` queues the next masks of the requests still running on the worker
     thread, which computes them while the engine returns its outputs and runs the next
     forward pass (llguidance drops the GIL). That overlap needs a core the forward does not
     use: where torch's threads already take every core the process may run on (2 threads on
     the project's 2-core machines), a third busy thread stalls the forward's OpenMP barriers
     for more than the masks cost, so the masks are computed right there on the engine thread
     instead (`overlap`, chosen once at start and logged).

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
        overlap: bool | None = None,  # masks on a worker during the forward; None: spare_core()
    ) -> None:
        self.compiler = GrammarCompiler(make_tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.overlap = spare_core() if overlap is None else overlap
        self._worker: ThreadPoolExecutor | None = None  # started with the first grammar
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
            where = "on a worker during the forward" if self.overlap else "on the engine thread"
            log.info("structured outputs: next-token masks computed %s", where)
            self._announced = True
        if self.overlap:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvlm-grammar")
            job = self._worker.submit(compute_banned, matchers, self.vocab_size)
        else:  # no core to spare: computed now, between the sampler and the next forward
            job = Future()
            job.set_result(compute_banned(matchers, self.vocab_size))
        for row, grammar in enumerate(grammars):
            grammar.pending, grammar.row = job, row

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
