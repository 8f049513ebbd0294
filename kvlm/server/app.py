"""The FastAPI app: OpenAI-compatible routes under /v1, plus /health and /metrics.

`build_app` wires an `AsyncLLMEngine` (already running) to the routes; it does not own the
engine, so the caller shuts the engine down after the server stops.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.server.chat import create_chat_completion
from kvlm.server.completions import create_completion
from kvlm.server.errors import APIError, install_error_handlers
from kvlm.server.metrics import ServerMetrics
from kvlm.server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from kvlm.server.responses import ModelCard, ModelList, now
from kvlm.server.serving import ClientDisconnected, ServingContext

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; never seen


class APIKeyMiddleware:
    """Every /v1 route needs `Authorization: Bearer <key>`; /health and /metrics do not.

    Checked before the body is read, so a bad key is a 401 whatever the body holds.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization")
            if given is None or not hmac.compare_digest(given, self.expected):
                message = (
                    "missing API key: send the header 'Authorization: Bearer <key>'"
                    if given is None
                    else "invalid API key: the Authorization header does not carry the key "
                    "this server was started with (--api-key)"
                )
                error = APIError(message, status_code=401, code="invalid_api_key")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None
) -> FastAPI:
    app = FastAPI(title="kvlm", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine, served_model_name)
    ctx = ServingContext(engine, served_model_name, metrics)
    app.state.serving = ctx
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_alive:
            return JSONResponse({"status": "ok"})
        error = APIError("the engine thread has stopped", status_code=503, type="server_error")
        return error.to_response()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=served_model_name, created=now(), max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    # Bodies are parsed by hand (not as FastAPI parameters) so every bad body is a 400 that
    # says what is wrong, whatever the Content-Type.
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), ChatCompletionRequest)
        return await create_chat_completion(ctx, body, request)

    return app
