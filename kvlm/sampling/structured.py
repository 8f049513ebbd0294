"""Constrained decoding inside the engine loop: one llguidance matcher per constrained request,
the next-token bitmasks of all of them computed in one call on a worker thread while the engine
does other work, applied to the constrained rows' logits only.

The step, for the constrained rows (unconstrained rows are never touched or copied):
  1. `masks(grammars)` waits for the prefetch (normally done already) and returns one `RowMask`:
     an additive float mask (0 allowed, -inf banned) for those rows, expanded from the int32
     bitmask into a buffer kept between steps; the sampler adds it to those rows in place;
  2. `advance(grammar, token)` feeds the sampled token to the matcher; True when the grammar
     is complete (nothing but end-of-sequence could follow), and the request stops there;
  3. `prefetch(grammars)` hands the matchers still running to llguidance's executor
     (`LLExecutor`, Rust threads, GIL dropped), which writes each one's next bitmask into its
     row of one preallocated [max_rows, words] int32 buffer. Where a core is spare
     (`spare_core()`: the process may run on more cores than torch's threads take), the
     executor uses the spare cores while the engine returns its outputs and runs the next
     forward. Where torch's threads already take every core (2 threads on the project's
     2-core machines), a busy thread during the forward stalls its OpenMP barriers for more
     than the masks cost, so the executor runs on every core during the engine's host work
     between two forwards (outputs, detokenizing, scheduling, the next step's inputs), when
     torch's threads are idle: `before_forward()` waits for it before the next forward starts
     (`overlap`, chosen once at start and logged).

A request's matcher has consumed exactly its generated tokens: preemption keeps those tokens
(the scheduler recomputes their K/V only), so the matcher and its pending mask stay valid (a
pending mask whose row the next prefetch would overwrite is copied out first); prefix caching
changes no token. A mask is computed before its row is sampled and the matcher only advances
after that, so the worker and the engine thread never touch one matcher at once.
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
from kvlm.sampling.structured_grammar import GrammarCompiler, bitmask_words
from kvlm.sampling.structured_params import StructuredOutputsParams

log = logging.getLogger(__name__)

NEG_INF_BITS = -8388608  # 0xFF800000 as int32: the bits of float32 -inf (0 is those of +0.0)


def spare_core() -> bool:
    """True when the process may run on more cores than torch's intra-op threads take."""
    return len(os.sched_getaffinity(0)) > torch.get_num_threads()


@dataclass
class RequestGrammar:
    """One request's matcher and where its next bitmask is: row `row` of `mask` (the decoder's
    prefetch buffer, a private copy, or the compiled grammar's first mask); None between
    `advance` and `prefetch`."""

    matcher: llguidance.LLMatcher
    mask: torch.Tensor | None  # [rows, words] int32, host memory
    row: int = 0


class StructuredDecoder:
    """The engine's constrained decoding: compiles constraints, owns the mask executor and
    the buffers masks are written to and expanded in (allocated at the first prefetch)."""

    def __init__(
        self,
        make_tokenizer: Callable[[], llguidance.LLTokenizer],
        vocab_size: int,
        max_rows: int,  # constrained rows in one step at most: the engine's max_num_seqs
        device: torch.device | str = "cpu",  # where the logits are
        overlap: bool | None = None,  # masks computed through the forward; None: spare_core()
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.compiler = GrammarCompiler(make_tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.max_rows = max_rows
        self.device = torch.device(device)
        self.overlap = spare_core() if overlap is None else overlap
        cores = len(os.sched_getaffinity(0))
        # Through the forward: the cores torch leaves; between forwards: all of them.
        self.num_threads = max(1, cores - torch.get_num_threads()) if self.overlap else cores
        self._worker: ThreadPoolExecutor | None = None  # started with the first prefetch
        self._executor: llguidance.LLExecutor | None = None
        self._job: Future[None] | None = None  # the latest prefetch
        self._bits: torch.Tensor | None = None  # [max_rows, words] int32, llguidance writes
        self._gathered: torch.Tensor | None = None  # [max_rows, words] a step's rows, reordered
        self._in_bits: list[RequestGrammar] = []  # the grammars of the latest prefetch
        self._inverted: torch.Tensor | None = None  # [max_rows, words] int32 on device
        self._expanded: torch.Tensor | None = None  # [rows, words, 32] int32 on device, grown
        self._shifts = torch.arange(31, -1, -1, dtype=torch.int32, device=self.device)  # [32]

    def start(self, spec: StructuredOutputsParams) -> RequestGrammar:
        """A matcher at the start of `spec`'s grammar, its first mask ready (computed when
        the grammar was compiled); StructuredOutputsError when `spec` cannot be used."""
        compiled = self.compiler.compile(spec)
        return RequestGrammar(compiled.matcher.deep_copy(), compiled.first_mask)

    @property
    def busy(self) -> bool:
        """True while the latest prefetch is still being computed."""
        return self._job is not None and not self._job.done()

    def masks(self, grammars: Sequence[RequestGrammar | None]) -> RowMask | None:
        """The mask of each constrained row (None when no row is constrained). The RowMask
        is a view of buffers the next `masks` call rewrites: apply it before then."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        if len(rows) > self.max_rows:
            raise ValueError(f"{len(rows)} constrained rows, more than max_rows ({self.max_rows})")
        pending: list[tuple[torch.Tensor, int]] = []  # (where its mask is, row there)
        for i in rows:
            grammar = grammars[i]
            assert grammar is not None and grammar.mask is not None, "advanced, not prefetched"
            pending.append((grammar.mask, grammar.row))
        bits = self._bits  # None before the first prefetch
        if self._job is not None and any(mask is bits for mask, _ in pending):
            self._job.result()
        if bits is not None and all(m is bits and r == k for k, (m, r) in enumerate(pending)):
            step_bits = bits[: len(rows)]  # the rows of the latest prefetch in order: most steps
        else:  # requests joined, left or were preempted since the prefetch: one copy per row
            if self._gathered is None:
                self._gathered = torch.empty(self.max_rows, self.words, dtype=torch.int32)
            step_bits = self._gathered[: len(rows)]
            for k, (mask, row) in enumerate(pending):
                step_bits[k].copy_(mask[row])
        return RowMask(rows, self._additive(step_bits))

    def _additive(self, bits: torch.Tensor) -> torch.Tensor:
        """bits [n, words] int32 (host) -> [n, vocab_size] float32 on the device, 0 where a
        token is allowed and -inf where not: a view of `_expanded`, three passes, no
        allocation once the buffers have grown to the step's rows."""
        num_rows = bits.shape[0]
        if self._inverted is None:
            self._inverted = torch.empty(
                self.max_rows, self.words, dtype=torch.int32, device=self.device
            )
        if self._expanded is None or self._expanded.shape[0] < num_rows:
            size = min(self.max_rows, 1 << (num_rows - 1).bit_length())  # powers of two
            self._expanded = torch.empty(
                size, self.words, 32, dtype=torch.int32, device=self.device
            )
        inverted = self._inverted[:num_rows]
        inverted.copy_(bits, non_blocking=True).bitwise_not_()  # bit set = banned
        expanded = self._expanded[:num_rows]  # [n, words, 32]
        torch.bitwise_left_shift(inverted.unsqueeze(2), self._shifts, out=expanded)  # to sign
        expanded.bitwise_right_shift_(31).bitwise_and_(NEG_INF_BITS)  # -1 -> bits of -inf
        return expanded.view(torch.float32).view(num_rows, -1)[:, : self.vocab_size]

    def advance(self, grammar: RequestGrammar, token_id: int) -> bool:
        """Feed the sampled token; True when the grammar is complete. A token the mask did
        not allow is a bug, and raised as one."""
        grammar.mask = None
        if not grammar.matcher.consume_token(token_id):
            raise RuntimeError(
                f"token {token_id} broke the grammar it was sampled under: "
                f"{grammar.matcher.get_error()[:300]}"
            )
        return grammar.matcher.is_stopped()

    def prefetch(self, grammars: Sequence[RequestGrammar]) -> None:
        """Start computing the next bitmask of each grammar (advanced this step) into row i
        of the prefetch buffer, in one executor call."""
        if not grammars:
            return
        if len(grammars) > self.max_rows:
            raise ValueError(f"{len(grammars)} grammars, more than max_rows ({self.max_rows})")
        if self._worker is None:
            self._start()
        assert self._bits is not None and self._executor is not None and self._worker
        if self._job is not None:
            self._job.result()  # the buffer is about to be rewritten
        now = {id(g) for g in grammars}
        for grammar in self._in_bits:  # not sampled this step (preempted): keep its mask
            if grammar.mask is self._bits and id(grammar) not in now:
                grammar.mask, grammar.row = self._bits[grammar.row : grammar.row + 1].clone(), 0
        for row, grammar in enumerate(grammars):
            grammar.mask, grammar.row = self._bits, row
        self._in_bits = list(grammars)
        self._job = self._worker.submit(
            self._executor.unsafe_compute_mask_ptr,
            [(g.matcher, row) for row, g in enumerate(grammars)],
            self._bits.data_ptr(),
            self.words * 4,
            self.max_rows,
        )

    def _start(self) -> None:
        where = "through the forward" if self.overlap else "between forwards"
        log.info(
            "structured outputs: next-token masks computed on %d executor thread(s) %s",
            self.num_threads,
            where,
        )
        self._bits = torch.zeros(self.max_rows, self.words, dtype=torch.int32)
        self._executor = llguidance.LLExecutor(self.num_threads)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvlm-grammar")

    def before_forward(self) -> None:
        """Called by the engine before each forward: without a spare core, waits for the
        latest prefetch, so that the executor never competes with torch's threads."""
        if self._job is not None and not self.overlap:
            self._job.result()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
