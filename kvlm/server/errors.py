"""OpenAI-shaped error objects, and the handlers that turn every failure into one.

Body: `{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`. Bad input is 400
(never FastAPI's 422), a missing or wrong API key 401, an unexpected exception 500; the server
keeps serving after any of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("kvlm.server")

# Pydantic tags union members in an error's location ("stop", "str"); they are not fields.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\-]")


class APIError(Exception):
    """An error to send to the client as-is."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else None
        return JSONResponse(self.to_dict(), status_code=self.status_code, headers=headers)


def server_error(error: BaseException) -> APIError:
    return APIError(
        f"internal server error: {type(error).__name__}: {error}",
        status_code=500,
        type="server_error",
        code="internal_error",
    )


def validation_error(errors: Sequence[Any]) -> APIError:
    """The first problem pydantic found, as one sentence naming the field and the value."""
    if not errors:
        return APIError("invalid request body")
    # Of a union's alternatives, the deepest error is usually the informative one.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return APIError(f"request body is not valid JSON: {reason}".rstrip(": "), code="bad_json")
    loc = [p for p in first.get("loc", ()) if p != "body"]
    path = [str(p) for p in loc if isinstance(p, int) or not _TYPE_TAG.search(str(p))]
    param = ".".join(path) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        return APIError(
            f"unknown field {param!r}: it is neither one of OpenAI's fields nor a kvlm "
            "extension (see /openapi.json); remove it",
            param=param,
            code="unknown_parameter",
        )
    if first.get("type") == "missing":
        if param is None:
            return APIError("request body is missing: send a JSON object", code="bad_json")
        return APIError(f"{param} is required", param=param)
    if param is None:
        return APIError(f"request body: {message}", code="bad_json")
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return APIError(f"{param}: {message}, got {shown}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).to_response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return APIError(message, status_code=exc.status_code, type=kind, code=code).to_response()


class UnexpectedErrorMiddleware:
    """An exception no handler took becomes the 500 error object, and the connection stays.

    Starlette's handler for `Exception` answers and then re-raises, and uvicorn closes the
    keep-alive connection after that, so the client's next request on it was reset. Once a
    response has started (a stream), nothing can be sent: the exception goes on up.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:
                raise
            method, path = scope.get("method"), scope.get("path")
            logger.error("unexpected error on %s %s", method, path, exc_info=exc)
            await server_error(exc).to_response()(scope, receive, send)
