"""Ray Serve request routers for the engine deployment (Serve's custom-router API).

Every engine request carries a `RouteHint` as its first argument (`bridge.HTTPCall.route`).
`choose_replicas` returns ranks of replicas; Serve sends the request to a replica of the first
rank that has room (fewer than `max_ongoing_requests`), so a rank is a preference, not a
promise.

- `PrefixAffinityRouter`: a pinned request goes to its replica; a prompt goes to its favourite
  (`affinity.PrefixAffinity`) unless the favourite is busy, i.e. has more than `max_imbalance`
  ongoing requests above the least-loaded replica, in which case it goes to the least-loaded
  one (and that replica becomes the favourite of its blocks); a request without a prompt goes
  to the least-loaded replica.
- `RoundRobinRouter`: replicas in turn, whatever the prompt (the baseline the affinity
  benchmark compares against); pins are honoured too.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvlm.ray_serve.affinity import DEFAULT_MAX_TRACKED_BLOCKS, PrefixAffinity, RouteHint

logger = logging.getLogger(__name__)
# A favourite this many ongoing requests above the least-loaded replica is busy: at 4, a
# replica batching 32 sequences is at most one eighth above its peer before prompts spill.
DEFAULT_MAX_IMBALANCE = 4


def _offered_all(pending_request: PendingRequest | None) -> None:
    """Tell Serve the ranks returned hold every replica this request may go to, so that when
    none has room it backs off before asking again (without it, it asks again at once, in a
    loop that starves the event loop its queue-length probes answer on)."""
    if pending_request is not None:
        pending_request.routing_context.should_backoff = True


def route_hint(pending_request: PendingRequest | None) -> RouteHint:
    """The hint the ingress attached (`HTTPCall` first argument); an empty one otherwise."""
    if pending_request is None or not pending_request.args:
        return RouteHint()
    hint = getattr(pending_request.args[0], "route", None)
    return hint if isinstance(hint, RouteHint) else RouteHint()


def _settled(
    hint: RouteHint, candidates: list[RunningReplica], pending_request: PendingRequest | None
) -> list[list[RunningReplica]] | None:
    """The ranks when routing is already decided, else None (the router chooses): none without
    candidates; a pinned request's replica, or any replica when that one is gone (which then
    answers 404 naming the replica: see `replica.KVLMReplica.serve_http`)."""
    _offered_all(pending_request)
    if not candidates:
        return []
    if hint.replica is None:
        return None
    chosen = [r for r in candidates if r.replica_id.unique_id == hint.replica]
    return [chosen or candidates]


class PrefixAffinityRouter(RequestRouter):
    """See the module doc. Its state is per router (one per ingress replica)."""

    def initialize_state(
        self,
        max_imbalance: int = DEFAULT_MAX_IMBALANCE,
        max_tracked_blocks: int = DEFAULT_MAX_TRACKED_BLOCKS,
    ) -> None:
        if max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {max_imbalance}")
        self.max_imbalance = max_imbalance
        self.affinity = PrefixAffinity(max_tracked_blocks)
        self._in_flight: Counter[str] = Counter()  # replica id -> requests not completed

    def _load(self, replica: RunningReplica) -> int:
        """Requests this router sent to the replica that have not completed yet (Serve's
        queue-length cache is refreshed only by probes, and goes stale between them)."""
        return self._in_flight[replica.replica_id.unique_id]

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        hint = route_hint(pending_request)
        settled = _settled(hint, candidate_replicas, pending_request)
        if settled is not None:
            return settled
        # One rank per replica, least loaded first: within a rank Serve would pick by its own
        # queue-length cache, which is stale between probes.
        by_load = [[r] for r in sorted(candidate_replicas, key=self._load)]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        favourite_id = self.affinity.favourite(hint.block_hashes, list(by_id))
        if favourite_id is None:
            return by_load
        favourite = by_id[favourite_id]
        if self._load(favourite) - self._load(by_load[0][0]) > self.max_imbalance:
            return by_load
        return [[favourite], *(rank for rank in by_load if rank[0] is not favourite)]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: object
    ) -> None:
        self._in_flight[replica_id.unique_id] += 1
        hint = route_hint(pending_request)
        if hint.block_hashes:
            self.affinity.placed(hint.block_hashes, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Serve calls it exactly once for every request it sent (finished, failed or
        cancelled)."""
        self._in_flight[replica_id.unique_id] -= 1
        if self._in_flight[replica_id.unique_id] <= 0:
            del self._in_flight[replica_id.unique_id]


class RoundRobinRouter(RequestRouter):
    """Replicas in turn (pins honoured); the baseline for `benchmarks/ray_affinity.py`."""

    def initialize_state(self) -> None:
        self._turn = itertools.count()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        hint = route_hint(pending_request)
        settled = _settled(hint, candidate_replicas, pending_request)
        if settled is not None:
            return settled
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        first = next(self._turn) % len(ordered)
        return [[ordered[first]], ordered[first + 1 :] + ordered[:first]]
