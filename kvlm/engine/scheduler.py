"""Decides, each step, which requests run and how many of their tokens are computed.

Continuous batching: running requests first (a one-token decode, or the next chunk of a long
prompt), then waiting ones join while the token budget and sequence limit allow. Prompts are
prefilled in chunks of at most the remaining budget, so decodes keep flowing beside them. When
blocks run out, the newest running request is preempted: its blocks are freed and it is
recomputed later (its generated tokens are kept).

The scheduler is the one owner of KV state: it allocates, lets windows free what they passed,
names full blocks for prefix hits (each request's block hashes are computed once, here) and
frees finished requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvlm.engine.config import EngineConfigError
from kvlm.engine.observers import RequestEvent
from kvlm.engine.request import Request, RequestStatus
from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.block_pool import OutOfBlocksError
from kvlm.kv.cache_manager import KVCacheManager, PrefixHit

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from kvlm.engine.offload import OffloadConnector


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise EngineConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise EngineConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per request, tokens computed now
    # (group, source, destination) whole-block copies to make before the step runs: a prefix
    # adapter's partial last block, into the block a newly admitted request fills next; a
    # forked request's shared partial block, into the block it writes next (copy-on-write)
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)
    scores_prompt: bool = False  # some request still needs logits of its prompt rows

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)
        self.scores_prompt |= request.next_scored_row is not None

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


@dataclass
class SchedulerStats:
    num_prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hits: int = 0  # of those, tokens whose K/V were reused
    num_preemptions: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCacheManager | None) -> None:
        self.config = config
        self.cache = cache  # None in no-cache mode
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self.block_hashes: dict[str, list[bytes]] = {}  # per request, its full blocks' names
        # Offload tiers (set by the engine): waiting requests whose prefix is being fetched
        # step aside into `loading`, so they hold up neither the batch nor the queue.
        self.offload: OffloadConnector | None = None
        self.loading: dict[str, Request] = {}
        # Set by the engine while observers listen: hears admissions and preemptions.
        self.notify: Callable[[RequestEvent], None] | None = None

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if self.config.use_cache:
                num_tokens = self._fit_drafts(request, budget)
            else:  # the baseline recomputes the whole sequence, never in chunks
                request.num_computed_tokens = 0
                num_tokens = len(request.token_ids)
            if self._reserve(request, num_tokens, batch):
                batch.add(request, num_tokens)
                budget = max(budget - num_tokens, 0)
        if self.offload is not None:
            done = self.offload.finished_loads()
            loaded = [self.loading.pop(i) for i in done if i in self.loading]
            self.waiting.extendleft(reversed(loaded))
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            scores = request.next_scored_row is not None  # fetches no prefix it must compute
            if self.offload is not None and self.cache is not None and not scores:
                hashes = self._hashes(request, len(request.token_ids))
                if self.offload.start_load(request, hashes):
                    self.loading[self.waiting.popleft().request_id] = request
                    continue
            num_tokens = self._admit(request, budget, batch)
            if num_tokens == 0:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.add(request, num_tokens)
            budget -= num_tokens
            if self.notify is not None:
                cached = request.num_computed_tokens - request.num_virtual_tokens
                self.notify(RequestEvent("admitted", request, cached))
        return batch

    def update_after_step(self, batch: ScheduledBatch) -> None:
        """Count the tokens just computed, name the blocks they filled, and return to the pool
        the blocks that fell behind a window (the next query cannot read them)."""
        for request, num_tokens in zip(batch.requests, batch.num_new_tokens, strict=True):
            request.num_computed_tokens += num_tokens
            if self.cache is not None:
                # Draft tokens are not verified yet: only known tokens' blocks are named, and
                # windows pass only them, so a rollback finds every block it keeps.
                verified = min(request.num_computed_tokens, len(request.token_ids))
                # The list may name more blocks (admission hashes the whole prompt): a chunk
                # ending inside a block leaves its other rows unwritten, so only the blocks
                # full of computed tokens are named, never one a prefix hit would read early.
                hashes = self._hashes(request, verified)[: verified // self.cache.block_size]
                self.cache.cache_full_blocks(request.request_id, hashes)
                self.cache.remove_skipped(request.request_id, verified)

    def roll_back(self, request: Request, num_tokens: int) -> None:
        """Keep the K/V of the request's first `num_tokens` tokens only (its rejected draft
        tokens' blocks go back to the pool); the next step computes from there."""
        assert self.cache is not None, "speculative decoding needs the KV cache"
        request.num_computed_tokens = num_tokens
        self.cache.truncate(request.request_id, num_tokens)

    def fork(self, parent: Request, child: Request) -> None:
        """Run `child`, whose tokens are the running `parent`'s so far, beside it: the child
        holds every block of the parent by reference (beams, n > 1) and computes nothing
        again; whichever first writes into a shared partial block gets a copy (`_reserve`)."""
        assert parent.status == RequestStatus.RUNNING, f"request {parent.request_id} is not running"
        assert child.token_ids == parent.token_ids, "a fork starts with its parent's tokens"
        if self.cache is not None:
            self.cache.fork(parent.request_id, child.request_id)
            self.block_hashes[child.request_id] = list(self.block_hashes[parent.request_id])
            child.metrics.kv_peak_bytes = self.cache.bytes_held(child.request_id)
        child.num_computed_tokens = parent.num_computed_tokens
        child.press_at = parent.press_at
        child.num_dropped_tokens = parent.num_dropped_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def finish(self, request: Request) -> None:
        """Take a finished (or aborted) request out and return its blocks to the pool."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.loading.pop(request.request_id, None)
        if self.offload is not None:
            self.offload.forget(request.request_id)
        request.status = RequestStatus.FINISHED
        self.block_hashes.pop(request.request_id, None)
        if self.cache is not None and self.cache.holds(request.request_id):
            self.cache.free(request.request_id)

    def _hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        """The request's block hashes, extended to its first `num_tokens` tokens."""
        assert self.cache is not None
        hashes = self.block_hashes.get(request.request_id)
        if hashes is None:  # a virtual prefix's blocks are named by the prefix's hashes
            prefix = request.virtual_prefix
            hashes = self.block_hashes[request.request_id] = list(
                () if prefix is None else prefix.block_hashes
            )
        extend_block_hashes(
            hashes,
            request.token_ids,
            num_tokens,
            self.cache.block_size,
            request.cache_salt,
            request.extra_keys,
        )
        return hashes

    def _fit_drafts(self, request: Request, budget: int) -> int:
        """Tokens a running request computes now: its uncomputed known tokens, then its drafts
        if they all fit the budget and the free blocks (else none: drafts never preempt)."""
        num_known = len(request.token_ids) - request.num_computed_tokens
        drafts = request.spec_token_ids
        if drafts:
            assert self.cache is not None
            total = request.cache_lengths(len(self.cache.specs), num_known + len(drafts))
            if num_known + len(drafts) > budget or not self.cache.can_allocate(
                request.request_id, total
            ):
                drafts.clear()
        return _press_cap(
            request, request.num_computed_tokens, min(num_known + len(drafts), budget)
        )

    def _allocate(
        self, request: Request, num_tokens: int | Sequence[int], hit: PrefixHit | None = None
    ) -> bool:
        """Blocks for the request's first `num_tokens` tokens (per cache group, or the same in
        every group), if they fit; tracks its peak."""
        assert self.cache is not None
        if not self.cache.can_allocate(request.request_id, num_tokens, hit):
            return False
        self.cache.allocate(request.request_id, num_tokens, hit)
        held = self.cache.bytes_held(request.request_id)
        request.metrics.kv_peak_bytes = max(request.metrics.kv_peak_bytes, held)
        return True

    def _admit(self, request: Request, budget: int, batch: ScheduledBatch) -> int:
        """Allocate a waiting request's first chunk; 0 if it does not fit now."""
        if self.cache is None:
            total = len(request.token_ids)
            return total if total <= budget or not self.running else 0
        hashes = self._hashes(request, len(request.token_ids))
        # A request scoring its prompt computes every row it still needs: no hit past it.
        scored_row = request.next_scored_row
        limit = len(request.token_ids) if scored_row is None else scored_row + 1
        if request.press_pending:  # the press reads what its chunks compute: no hit past it
            assert request.press_at is not None
            window = request.press_window
            limit = min(limit, request.press_at if window is None else window[0] + 1)
        hit = self.cache.find_cached_prefix(hashes, limit)
        num_virtual = request.num_virtual_tokens  # never computed: their K/V are pinned
        num_cached = max(hit.num_tokens, num_virtual)
        num_tokens = min(len(request.token_ids) - num_cached, budget)
        num_tokens = _press_cap(request, num_cached, num_tokens)
        if not self._allocate(request, num_cached + num_tokens, hit):
            return 0
        if hit.num_tokens < num_virtual:  # the prefix's partial block is the request's to fill
            prefix = request.virtual_prefix
            assert prefix is not None
            assert hit.num_tokens == len(prefix.block_hashes) * self.cache.block_size, (
                "a virtual prefix's full blocks are pinned: always a hit"
            )
            tables = self.cache.block_tables(request.request_id)
            batch.block_copies += prefix.tail_copies(tables)
        request.num_computed_tokens = num_cached
        if request.metrics.num_preemptions == 0:
            request.metrics.num_cached_tokens = num_cached - num_virtual
            looked_up = request.num_prompt_tokens if scored_row is None else scored_row
            self.stats.num_prefix_queries += looked_up - num_virtual
            self.stats.num_prefix_hits += num_cached - num_virtual
        return num_tokens

    def _reserve(self, request: Request, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Make room for a running request's next tokens, preempting newer requests if needed;
        a shared partial block they go into is copied first (the copy joins `batch`).

        Returns False when the request itself had to be preempted.
        """
        if self.cache is None:
            return True
        needed = request.cache_lengths(len(self.cache.specs), num_tokens)
        while not (self._allocate(request, needed) and self._unshare(request, batch)):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _unshare(self, request: Request, batch: ScheduledBatch) -> bool:
        """Copy-on-write before the request's next write; False (nothing changed) when no
        block is free for the copy."""
        assert self.cache is not None
        try:
            lengths = request.cache_lengths(len(self.cache.specs))
            copies = self.cache.copy_on_write(request.request_id, lengths)
        except OutOfBlocksError:
            return False
        batch.block_copies += copies
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        assert self.cache is not None
        self.cache.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.spec_token_ids.clear()  # admission computes known tokens only
        request.forget_press()
        request.metrics.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)
        if self.notify is not None:
            self.notify(RequestEvent("preempted", request))


def _press_cap(request: Request, start: int, num_tokens: int) -> int:
    """`num_tokens` from token `start` on, cut so the chunk ends where the request's pending
    press runs."""
    if not request.press_pending:
        return num_tokens
    assert request.press_at is not None
    return min(num_tokens, request.press_at - start)
