"""The FastAPI app: OpenAI-compatible routes under /v1, plus /health, /metrics, the live cache
view at /cache and the OpenAPI schema at /openapi.json.

`build_app` wires an `AsyncLLMEngine` (already running) to the routes; it does not own the
engine, so the caller shuts the engine down after the server stops.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Receive, Scope, Send

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.server.cache_view_routes import CACHE_VIEW_PATH, browser_key, install_cache_view
from kvlm.server.driver import CHAT_COMPLETIONS, COMPLETIONS, generate
from kvlm.server.errors import APIError, UnexpectedErrorMiddleware, install_error_handlers
from kvlm.server.limits import (
    DEFAULT_MAX_REQUEST_BYTES,
    BodySizeLimitMiddleware,
    ModelLimits,
    PromptLengthLimit,
)
from kvlm.server.metrics import ServerMetrics
from kvlm.server.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    UNSUPPORTED_MESSAGE,
    UNSUPPORTED_STREAM_OPTIONS,
    ChatCompletionRequest,
    CompletionRequest,
    Unsupported,
)
from kvlm.server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    now,
)
from kvlm.server.serving import ClientDisconnected, ServingContext
from kvlm.server.sessions import install_session_routes

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; never seen
_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
_UNSUPPORTED: dict[str, dict[str, Unsupported]] = {  # schema name -> refused fields
    "CompletionRequest": UNSUPPORTED_COMPLETION,
    "ChatCompletionRequest": UNSUPPORTED_CHAT,
    "ChatMessage": UNSUPPORTED_MESSAGE,
    "StreamOptions": UNSUPPORTED_STREAM_OPTIONS,
}


class APIKeyMiddleware:
    """Every /v1 and /cache route needs `Authorization: Bearer <key>` (/cache routes also take
    it from a query parameter or cookie: see `cache_view_routes`); /health, /metrics and
    /openapi.json do not (the schema describes the API and holds nothing secret).

    Checked before the body is read, so a bad key is a 401 whatever the body holds.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(("/v1", CACHE_VIEW_PATH)):
            browser = path.startswith(CACHE_VIEW_PATH)
            given = dict(scope["headers"]).get(b"authorization")
            if given is None and browser:
                given = browser_key(scope)
            if given is None or not hmac.compare_digest(given, self.expected):
                hint = f" (in a browser: {CACHE_VIEW_PATH}?api_key=<key>)" if browser else ""
                message = (
                    f"missing API key: send the header 'Authorization: Bearer <key>'{hint}"
                    if given is None
                    else "invalid API key: the key sent (the Authorization header"
                    + (", or api_key / the kvlm_api_key cookie" if browser else "")
                    + ") is not the one this server was started with (--api-key)"
                )
                error = APIError(message, status_code=401, code="invalid_api_key")
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def model_limits(engine: AsyncLLMEngine, served_model_name: str) -> ModelLimits:
    max_model_len = engine.max_model_len
    return ModelLimits(
        name=served_model_name,
        max_model_len=max_model_len,
        vocab_size=engine.vocab_size,
        prompt_length=PromptLengthLimit(engine.tokenizer, max_model_len),
        unbounded_length=engine.unbounded_length,
        prefix_adapters=frozenset(engine.prefix_adapters),
        grammars=engine.engine.structured.compiler,  # thread-safe: prepare runs on workers
    )


def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    session_dir: Path | None = None,
) -> FastAPI:
    """`session_dir`: where the /v1/sessions routes keep session files (None: sessions off)."""
    app = FastAPI(title="kvlm", version="0.1.0", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(engine, served_model_name)
    ctx = ServingContext(engine, model_limits(engine, served_model_name), metrics)
    app.state.serving = ctx
    install_error_handlers(app)
    # Added last = outermost: the key is checked first, then the size, both before the body;
    # unexpected exceptions become 500s innermost.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    _document_bodies(app, secured=bool(api_key))

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

    install_cache_view(app, engine)
    install_session_routes(app, engine, session_dir)

    @app.get("/v1/models", responses=_ERRORS)
    async def models() -> ModelList:
        names = [served_model_name] + [f"{served_model_name}:{a}" for a in engine.prefix_adapters]
        created, max_model_len = now(), engine.max_model_len
        template = engine.tokenizer.chat_template_origin
        return ModelList(
            data=[
                ModelCard(
                    id=n, created=created, max_model_len=max_model_len, chat_template=template
                )
                for n in names
            ]
        )

    # Bodies are parsed by hand (not as FastAPI parameters) so every bad body is a 400 that
    # says what is wrong, whatever the Content-Type; `_document_bodies` puts them in the schema.
    @app.post("/v1/completions", responses=_generation_responses(CompletionResponse))
    async def completions(request: Request) -> Response:
        return await generate(ctx, COMPLETIONS, request)

    @app.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse))
    async def chat_completions(request: Request) -> Response:
        return await generate(ctx, CHAT_COMPLETIONS, request)

    return app


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "invalid or unsupported request (the message names the field)"),
        (401, "missing or wrong API key"),
        (413, "request body over --max-request-bytes"),
        (500, "internal error"),
        (503, "the engine has stopped"),
    ]
}


def _generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    ok = {
        "model": model,
        "description": "the completion; with stream=true, server-sent events of chunks",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    return {200: ok, **_ERRORS}


def _document_bodies(app: FastAPI, secured: bool) -> None:
    """Add the hand-parsed request bodies (and the bearer key, when one is set) to the schema
    FastAPI generates, so clients and fuzzers see every field."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema(
            [(model, "validation") for model in _BODIES.values()],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs.get("$defs", {}))
        for model, table in _UNSUPPORTED.items():
            properties = components["schemas"][model]["properties"]
            for name, rule in table.items():  # null is always accepted; the rest is a 400
                properties[name] = {"type": "null", "description": f"not supported: {rule.reason}"}
        for path, model in _BODIES.items():
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                    }
                },
            }
        if secured:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                if path.startswith("/v1"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
