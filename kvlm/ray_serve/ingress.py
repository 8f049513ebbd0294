"""`KVLMIngress`: the HTTP entry of the Ray Serve application.

It serves nothing itself but `/health` and `/metrics` (both over all replicas); every other
request goes, as bytes, to one engine replica (`bridge.HTTPCall`), whose kvlm app answers it,
and the answer streams back unchanged. What the ingress adds is where a request goes:

- a generation request's prompt is read as the replicas will read it and named by its block
  hashes (`prompt_key`), for the prefix router;
- a request can be pinned to one replica: header `x-kvlm-replica: ID`, or for the cache view
  `/cache?replica=ID`; the `/cache` page sets a cookie so its event stream and block look-ups
  reach the same replica's pool.

A replica lost before it answered is retried on another one; a replica lost mid-response
ends a streamed (SSE) response with an error event and `data: [DONE]`: never a hang.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvlm.engine.engine import load_tokenizer
from kvlm.loading import resolve_model_path
from kvlm.ray_serve.affinity import RouteHint
from kvlm.ray_serve.bridge import REPLICA_HEADER, HTTPCall, is_last_part
from kvlm.ray_serve.config import ServeAppConfig
from kvlm.ray_serve.metrics import merge_replica_metrics
from kvlm.ray_serve.prompt_key import PROMPT_ROUTES, prompt_block_hashes
from kvlm.ray_serve.replica import ReplicaFacts
from kvlm.server.cache_view_routes import CACHE_VIEW_PATH
from kvlm.server.errors import APIError, server_error
from kvlm.server.limits import ModelLimits, PromptLengthLimit
from kvlm.server.serving import SSE_DONE, sse

logger = logging.getLogger(__name__)
REPLICA_COOKIE = "kvlm_replica"
# A request whose replica is lost before it answered goes to another one, up to this many
# tries in all: Serve's router drops a replica once a call to it failed that way.
START_ATTEMPTS = 3
SCRAPE_TIMEOUT_S = 5.0  # one replica's /metrics; a slower one is reported down
_LOST = (RayActorError, ActorUnavailableError)


def _lost_error(replica: str, error: BaseException) -> APIError:
    if isinstance(error, _LOST):
        return APIError(
            f"the engine replica {replica} serving this request was lost "
            f"({type(error).__name__}); Serve is replacing it, and a retry goes to a live "
            "replica",
            status_code=503,
            type="server_error",
            code="replica_lost",
        )
    return server_error(error)


class KVLMIngress:
    async def __init__(
        self, config: ServeAppConfig, engines: DeploymentHandle, board: DeploymentHandle
    ) -> None:
        self.config = config
        self._engines = engines
        self._board = board
        path = resolve_model_path(config.engine.model)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, path)
        self._limits: tuple[ModelLimits, int] | None = None  # and the block size
        self._expected_key = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"]
        if path == "/health":
            return await self._health()
        if path == "/metrics":
            return await self._metrics()
        body = await self._body(request)
        pin = self._pin(request)
        hashes: tuple[bytes, ...] = ()
        if pin is None and path in PROMPT_ROUTES and self._authorized(request):
            limits, block_size = await self._model_limits()
            hashes = await asyncio.to_thread(
                prompt_block_hashes, path, body, self.tokenizer, limits, block_size
            )
        call = HTTPCall(
            method=request.method,
            path=path,
            query_string=request.scope.get("query_string", b""),
            headers=tuple(request.scope["headers"]),
            body=body,
            route=RouteHint(hashes, pin),
            client=request.scope.get("client"),
        )
        return await self._forward(call, set_cache_cookie=path == CACHE_VIEW_PATH)

    async def _body(self, request: Request) -> bytes:
        """The body, cut one byte past --max-request-bytes: the replica then refuses it (413)
        with the same message as `kvlm serve`, and a huge upload is never buffered whole."""
        limit = self.config.max_request_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                break
        return b"".join(chunks)[: limit + 1]

    def _authorized(self, request: Request) -> bool:
        """Only a request with the right key is tokenized here (the replica answers the rest
        with its 401); without --api-key, every request."""
        if self._expected_key is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, self._expected_key)

    @staticmethod
    def _pin(request: Request) -> str | None:
        pinned = request.headers.get(REPLICA_HEADER)
        if pinned is None and request.scope["path"].startswith(CACHE_VIEW_PATH):
            pinned = request.query_params.get("replica") or request.cookies.get(REPLICA_COOKIE)
        return pinned

    async def _model_limits(self) -> tuple[ModelLimits, int]:
        if self._limits is None:
            facts: ReplicaFacts = await self._engines.describe.remote()
            limits = ModelLimits(
                name=self.config.served_model_name,
                max_model_len=facts.max_model_len,
                vocab_size=facts.vocab_size,
                prompt_length=PromptLengthLimit(self.tokenizer, facts.max_model_len),
                unbounded_length=facts.unbounded_length,
                prefix_adapters=frozenset(facts.prefix_adapters),
            )
            self._limits = (limits, facts.block_size)
        return self._limits

    async def _forward(self, call: HTTPCall, set_cache_cookie: bool = False) -> Response:
        for attempt in range(1, START_ATTEMPTS + 1):
            stream = self._engines.options(stream=True).serve_http.remote(call)
            try:
                start = await stream.__anext__()
                break
            except _LOST as e:  # nothing was answered yet: another replica can take it
                if attempt == START_ATTEMPTS:
                    return _lost_error("(every one tried)", e).to_response()
                logger.warning("replica lost before answering (attempt %d): %r", attempt, e)
            except RayError as e:
                return _lost_error("(not yet chosen)", e).to_response()
        headers = dict(start["headers"])
        replica = headers.get(REPLICA_HEADER.encode(), b"?").decode()
        is_sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        response = StreamingResponse(self._rest(stream, replica, is_sse), start["status"])
        response.raw_headers = list(start["headers"])
        if set_cache_cookie and start["status"] == 200:
            response.set_cookie(REPLICA_COOKIE, replica, path=CACHE_VIEW_PATH, httponly=True)
        return response

    @staticmethod
    async def _rest(
        stream: DeploymentResponseGenerator, replica: str, is_sse: bool
    ) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for message in stream:
                if message["type"] == "http.response.body":
                    yield message.get("body", b"")
                finished = is_last_part(message)
        except RayError as e:
            finished = True
            if not is_sse:  # the status line is sent: the client sees a body cut short
                logger.warning("replica %s lost mid-response: %r", replica, e)
                return
            yield sse(_lost_error(replica, e).to_dict()).encode()
            yield SSE_DONE.encode()
        finally:
            if not finished:  # the client left: stop the replica's work on it
                stream.cancel()

    async def _health(self) -> Response:
        live = await self._board.live.remote()
        if not live:
            error = APIError(
                "no engine replica is live yet (they are loading, or all were lost and Serve "
                "is replacing them)",
                status_code=503,
                type="server_error",
            )
            return error.to_response()
        return JSONResponse({"status": "ok", "replicas": live})

    async def _metrics(self) -> Response:
        live: list[str] = await self._board.live.remote()
        # One after another: Serve gives concurrent calls made while serving one request the
        # same internal request id, and its router then hands one call's replica to another.
        texts = {replica: await self._scrape(replica) for replica in live}
        page = merge_replica_metrics(texts)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    async def _scrape(self, replica: str) -> str | None:
        call = HTTPCall("GET", "/metrics", b"", (), b"", RouteHint((), replica))
        stream = self._engines.options(stream=True).serve_http.remote(call)

        async def read() -> str | None:
            status, parts = 0, []
            async for message in stream:
                if message["type"] == "http.response.start":
                    status = message["status"]
                else:
                    parts.append(message.get("body", b""))
            return b"".join(parts).decode() if status == 200 else None

        try:
            return await asyncio.wait_for(read(), SCRAPE_TIMEOUT_S)
        except (asyncio.TimeoutError, RayError) as e:
            logger.warning("replica %s: /metrics not scraped: %r", replica, e)
            stream.cancel()
            return None
