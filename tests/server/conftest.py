"""One real server for the server tests: smollm2 behind uvicorn on 127.0.0.1 (an ephemeral port),
on a background thread of the test process, so tests can also reach its engine.

Started once per session (the first test that asks for it), stopped at the end; every server
log record at ERROR or above is kept in `LiveServer.errors` so tests can assert there were none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from live_server import API_KEY, MODEL_NAME, LiveServer, LogCollector

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import LLMEngine
from kvlm.server import build_app
from kvlm.server.launch import ServerThread, bind_socket


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model="smollm2")))
    app = build_app(engine, MODEL_NAME, API_KEY)
    thread = ServerThread(app, bind_socket("127.0.0.1", 0), log_level="warning")
    live = LiveServer(thread.url, engine)
    handler = LogCollector(live.errors)
    loggers = [logging.getLogger(name) for name in ("uvicorn", "kvlm")]
    for logger in loggers:
        logger.addHandler(handler)
    thread.start()
    try:
        yield live
    finally:
        thread.stop()
        engine.shutdown()
        for logger in loggers:
            logger.removeHandler(handler)
