"""One real server for the server tests: smollm2 behind uvicorn on 127.0.0.1 (an ephemeral port),
on a background thread of the test process, so tests can also reach its engine.

Started once per session (the first test that asks for it), stopped at the end; every server
log record at ERROR or above is kept in `LiveServer.errors` so tests can assert there were none.
The API fuzzers get a second one with a short context (`fuzz_server`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest
from live_server import API_KEY, MODEL_NAME, LiveServer, LogCollector

from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import LLMEngine
from kvlm.server import build_app
from kvlm.server.launch import ServerThread, bind_socket


@contextlib.contextmanager
def _serve(config: EngineConfig) -> Iterator[LiveServer]:
    engine = AsyncLLMEngine(LLMEngine(config))
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


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """Float weights, as `smollm2_llm`, which tests hold its greedy outputs to."""
    with _serve(EngineConfig(model="smollm2", weight_format="float")) as live:
        yield live


@pytest.fixture(scope="session")
def gemma3_server() -> Iterator[LiveServer]:
    """Gemma 3 270M, whose GGUF has no chat template (kvlm's built-in Gemma one is used)."""
    with _serve(EngineConfig(model="gemma3-270m")) as live:
        yield live


@pytest.fixture(scope="session")
def fuzz_server() -> Iterator[LiveServer]:
    """A server for API fuzzers: a 48-token context, so every request that passes the checks
    generates a few tokens at most, whatever max_tokens the fuzzer picks."""
    with _serve(EngineConfig(model="smollm2", max_model_len=48)) as live:
        yield live


@pytest.fixture(scope="module")
def small_kv_server() -> Iterator[LiveServer]:
    """A server whose pool holds one 64-token sequence and a little more (blocks of 4), so
    two long requests at once cannot both fit: one of them is preempted."""
    config = EngineConfig(
        model="smollm2", weight_format="float", block_size=4, max_model_len=64,
        kv_cache_memory="3MiB",
    )  # fmt: skip
    with _serve(config) as live:
        yield live
