"""`KVLMReplica`: one engine replica of the Ray Serve application.

Each replica owns one `AsyncLLMEngine` (its own engine thread and KV pool; the offload tiers
of `ServeAppConfig.engine.kv_offload`, Redis shared with every other replica) and the kvlm
FastAPI app around it, which serves every request the ingress forwards (`bridge.call_app`).

Invariants: a request pinned to another replica (`RouteHint.replica`) is answered 404 here,
never served (the router sends it here only when the pinned replica is gone); Serve's health
check fails once the engine thread has stopped, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import Message

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.engine import LLMEngine
from kvlm.ray_serve.board import HEARTBEAT_S
from kvlm.ray_serve.bridge import HTTPCall, call_app
from kvlm.ray_serve.config import ServeAppConfig
from kvlm.server import build_app
from kvlm.server.errors import APIError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaFacts:
    """What the ingress needs to read prompts as the replicas will (`ModelLimits`)."""

    max_model_len: int
    vocab_size: int
    unbounded_length: bool
    prefix_adapters: tuple[str, ...]
    block_size: int
    weight_format: str


class KVLMReplica:
    async def __init__(self, config: ServeAppConfig, board: DeploymentHandle) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        engine = await asyncio.to_thread(LLMEngine, config.engine)  # the load takes seconds
        self.engine = AsyncLLMEngine(engine)
        session_dir = Path(config.session_dir) if config.session_dir is not None else None
        self.app = build_app(
            self.engine,
            config.served_model_name,
            config.api_key,
            config.max_request_bytes,
            session_dir,
        )
        self._board = board
        await board.beat.remote(self.replica_id)
        self._heartbeat = asyncio.ensure_future(self._beat_forever())

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._board.beat.remote(self.replica_id)
            except Exception:  # the board is being replaced: the next beat re-registers
                logger.warning("replica %s: heartbeat failed", self.replica_id, exc_info=True)

    def describe(self) -> ReplicaFacts:
        config = self.engine.engine.config
        return ReplicaFacts(
            max_model_len=self.engine.max_model_len,
            vocab_size=self.engine.vocab_size,
            unbounded_length=self.engine.unbounded_length,
            prefix_adapters=self.engine.prefix_adapters,
            block_size=config.block_size,
            weight_format=config.weight_format,
        )

    async def serve_http(self, call: HTTPCall) -> AsyncIterator[Message]:
        """The app's response messages for `call` (a streaming Serve method)."""
        app = self.app
        if call.route.replica is not None and call.route.replica != self.replica_id:
            app = APIError(
                f"replica {call.route.replica!r} is not running (this is {self.replica_id!r}); "
                "GET /cache/replicas lists the live ones",
                status_code=404,
                code="no_such_replica",
            ).to_response()
        async for message in call_app(app, call, self.replica_id):
            yield message

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine thread stopped is replaced."""
        if not self.engine.is_alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread has stopped")

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        heartbeat = getattr(self, "_heartbeat", None)
        if heartbeat is not None:
            heartbeat.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            engine.engine.close()  # offload tiers: finish queued writes
