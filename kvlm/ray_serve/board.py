"""`ReplicaBoard`: which engine replicas are live, for the ingress to scrape and to list.

Serve's router knows its replicas but does not tell the deployment that calls it; so every
engine replica beats here every `HEARTBEAT_S`, and a replica is live while its last beat is
under `LIVE_S` old (a killed replica drops off within `LIVE_S`, without saying goodbye).
"""

from __future__ import annotations

import time

HEARTBEAT_S = 1.0
LIVE_S = 3 * HEARTBEAT_S


class ReplicaBoard:
    """One small replica (no CPU reserved); state is lost with it and rebuilt by the beats."""

    def __init__(self) -> None:
        self._beats: dict[str, float] = {}  # replica id -> time.monotonic() of its last beat

    def beat(self, replica_id: str) -> None:
        self._beats[replica_id] = time.monotonic()

    def leave(self, replica_id: str) -> None:
        self._beats.pop(replica_id, None)

    def live(self) -> list[str]:
        """Ids of the replicas that beat within `LIVE_S`, sorted."""
        now = time.monotonic()
        self._beats = {rid: t for rid, t in self._beats.items() if now - t < LIVE_S}
        return sorted(self._beats)
