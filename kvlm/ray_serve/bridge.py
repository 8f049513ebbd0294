"""One HTTP request carried from the ingress to an engine replica, and run there through the
replica's own kvlm FastAPI app (`kvlm.server.build_app`), in process, as ASGI.

So every route, error body, streaming format, API-key check and size limit of `kvlm serve` is
the same code behind Ray Serve: the ingress only forwards bytes. The response comes back as
the app's ASGI messages, in order (`http.response.start`, then `http.response.body` parts).

Invariant: however the consumer of `call_app` stops (last part read, cancelled, closed), the
app sees `http.disconnect` on its next `receive()`, so a generation it was streaming is
aborted and its KV blocks go back to the pool (`kvlm.server.serving`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

from kvlm.ray_serve.affinity import RouteHint

logger = logging.getLogger(__name__)
REPLICA_HEADER = "x-kvlm-replica"  # on every response: the replica that served it
_APP_EXIT_TIMEOUT_S = 5.0  # after the last part (or a disconnect), for the app to return


@dataclass(frozen=True)
class HTTPCall:
    """An HTTP request as the ingress received it, plus where it should go."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # lower-case names, as ASGI gives them
    body: bytes
    route: RouteHint
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": self.query_string,
            "root_path": "",
            "headers": list(self.headers),
            "client": self.client,
            "server": None,
            "state": {},
        }


def is_last_part(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


async def call_app(app: ASGIApp, call: HTTPCall, replica_id: str) -> AsyncIterator[Message]:
    """Run `call` through `app`; yield its response messages (the start message carries
    `REPLICA_HEADER`). Ends after the last body part."""
    parts: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), replica_id.encode())]
            message = {**message, "headers": headers}
        await parts.put(message)

    def finished(task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        parts.put_nowait(error)  # None: returned

    task = asyncio.ensure_future(app(call.scope(), receive, send))
    task.add_done_callback(finished)
    try:
        while True:
            part = await parts.get()
            if part is None:
                return
            if isinstance(part, BaseException):
                raise part
            yield part
            if is_last_part(part):
                return
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), _APP_EXIT_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning(
                    "%s %s: the app did not return after the response", call.method, call.path
                )
                task.cancel()
            except Exception:  # it already sent its whole response; log what it raised after
                logger.exception("%s %s raised after its response", call.method, call.path)
