"""`/cache`: the live cache view page, its event stream and the details of one block.

The page is one static file (`static/cache.html`: HTML, CSS and JS, no build step). It opens
`/cache/events`, a server-sent event stream: the snapshot, then one delta per engine step,
at most one event every `MIN_INTERVAL_S` (the deltas of faster steps, or of a client reading
slowly, are merged into one), and a comment line every `KEEPALIVE_S` while nothing happens.
A click on a block asks `/cache/blocks/{group}/{id}`.

Under `--api-key` the routes need the key like every other route. A browser cannot put an
`Authorization` header on a page it navigates to or on an `EventSource`, so /cache routes also
take it as the query parameter `?api_key=KEY` or the cookie `kvlm_api_key`; the page sets that
cookie (scoped to /cache, HttpOnly) when opened with the parameter, so its stream and look-ups
carry the key without it appearing in more URLs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from importlib import resources
from urllib.parse import parse_qs
from weakref import WeakKeyDictionary

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Scope

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.server.cache_view import CacheDelta, CacheWatch
from kvlm.server.errors import APIError
from kvlm.server.serving import sse

CACHE_VIEW_PATH = "/cache"
KEY_PARAM = "api_key"
KEY_COOKIE = "kvlm_api_key"
KEEPALIVE_S = 15.0
MIN_INTERVAL_S = 0.05  # at most 20 events a second, however fast the engine steps
_START_TIMEOUT_S = 30.0


def browser_key(scope: Scope) -> bytes | None:
    """`Bearer <key>` from the query parameter or the cookie, for /cache routes only."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if KEY_PARAM in query:
        return f"Bearer {query[KEY_PARAM][0]}".encode()
    cookie_header = dict(scope["headers"]).get(b"cookie")
    if cookie_header is not None:
        cookie = SimpleCookie()
        cookie.load(cookie_header.decode("latin-1"))
        if KEY_COOKIE in cookie:
            return f"Bearer {cookie[KEY_COOKIE].value}".encode()
    return None


class _Subscriber:
    """One client's deltas: put by the engine thread, read (and merged) on the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[CacheDelta] = asyncio.Queue()

    def put(self, delta: CacheDelta) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        except RuntimeError:  # the event loop is closed
            return False
        return True

    async def next(self, timeout: float) -> CacheDelta | None:
        """Every delta queued so far, merged into one; None if none came within `timeout`."""
        try:
            delta = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        while not self._queue.empty():
            delta = delta.merge(self._queue.get_nowait())
        return delta


_WATCHES: WeakKeyDictionary[AsyncLLMEngine, CacheWatch] = WeakKeyDictionary()
_WATCHES_LOCK = threading.Lock()


def _watch(engine: AsyncLLMEngine) -> CacheWatch | None:
    """The engine's one watch (several apps may serve one engine); None without a cache or
    with the engine thread stopped (the routes then say which)."""
    if engine.engine.kv_cache is None or not engine.is_alive:
        return None
    with _WATCHES_LOCK:
        if engine not in _WATCHES:
            # Made on the engine thread; it observes the engine only while a client listens.
            _WATCHES[engine] = engine.call(CacheWatch).result(_START_TIMEOUT_S)
        return _WATCHES[engine]


def install_cache_view(app: FastAPI, engine: AsyncLLMEngine) -> None:
    """Add the /cache routes, fed by the engine's watch."""
    watch = _watch(engine)

    def watching() -> CacheWatch:
        if not engine.is_alive:
            raise APIError("the engine thread has stopped", status_code=503, type="server_error")
        if watch is None:
            raise APIError(
                "this server runs without a KV cache (--no-cache): there is no cache to view",
                status_code=404,
                code="no_cache",
            )
        return watch

    @app.get(CACHE_VIEW_PATH, include_in_schema=False)
    async def cache_page(request: Request) -> Response:
        watching()
        page = resources.files("kvlm.server").joinpath("static/cache.html").read_text("utf-8")
        response = HTMLResponse(page)
        key = request.query_params.get(KEY_PARAM)
        if key is not None:  # the middleware has checked it
            response.set_cookie(
                KEY_COOKIE, key, path=CACHE_VIEW_PATH, httponly=True, samesite="strict"
            )
        return response

    @app.get(f"{CACHE_VIEW_PATH}/events", include_in_schema=False)
    async def cache_events() -> Response:
        current = watching()
        sink = _Subscriber()
        future = engine.call(lambda e: current.subscribe(e, sink))
        snapshot = await asyncio.wrap_future(future)

        async def events() -> AsyncIterator[str]:
            try:
                yield sse(snapshot)
                while engine.is_alive:
                    delta = await sink.next(KEEPALIVE_S)
                    if delta is None:
                        yield ": keepalive\n\n"
                        continue
                    yield sse(delta)
                    await asyncio.sleep(MIN_INTERVAL_S)  # later deltas wait and merge
            finally:  # the client left (or the server stops): no more deltas for it
                engine.call(lambda e: current.unsubscribe(sink))

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.get(f"{CACHE_VIEW_PATH}/blocks/{{group}}/{{block_id}}", include_in_schema=False)
    async def cache_block(group: int, block_id: int) -> Response:
        current = watching()
        future = engine.call(lambda e: current.block_info(e, group, block_id))
        try:
            info = await asyncio.wrap_future(future)
        except IndexError as e:
            raise APIError(str(e), status_code=404, code="no_such_block") from e
        return JSONResponse(info.model_dump(mode="json"))
