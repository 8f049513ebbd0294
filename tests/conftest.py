"""Session-wide fixtures: each real model file is located once per test session.

`smollm2_llm` / `gemma3_llm` load float weights (weight_format="float", not the "auto"
default): the transformers oracle and every test comparing tokens with them need its numerics.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvlm.loading.registry import resolve_model_path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return resolve_model_path("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_llm():
    from kvlm import LLM

    return LLM("smollm2", weight_format="float")


@pytest.fixture(scope="session")
def gemma3_llm():
    from kvlm import LLM

    return LLM("gemma3-270m", weight_format="float")


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, without persistence, stopped afterwards
    (module scope: a test may kill it). Skipped when the redis-server binary is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    try:
        yield RedisServer(f"redis://127.0.0.1:{port}", proc)
    finally:
        proc.kill()
        proc.wait(timeout=10)
