"""One request cannot freeze the server: bodies over --max-request-bytes are refused (413)
before they are read, prompts that cannot fit are refused before tokenizing, and tokenizing
runs off the event loop, so other clients keep being served meanwhile."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from live_server import API_KEY, MODEL_NAME, LiveServer

from kvlm.server import build_app
from kvlm.server.launch import ServerThread, bind_socket
from kvlm.server.limits import DEFAULT_MAX_REQUEST_BYTES

HUGE = 30 * 1024 * 1024  # the 30 MB request that once froze every client for 45 s
CHUNK = 1024 * 1024


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _headers(path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: kvlm\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body[: _length(data)])


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next(int(line.split(":")[1]) for line in head.splitlines() if "content-length" in line)


def _send_chunked(sock: socket.socket, path: str, total: int) -> None:
    """A JSON body of `total` bytes, sent in chunks until the server stops reading."""
    sock.sendall(_headers(path, "Transfer-Encoding: chunked\r\n"))
    body = b'{"prompt": "' + b"a" * (total - 15) + b'"}'
    try:
        for start in range(0, len(body), CHUNK):
            piece = body[start : start + CHUNK]
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server answered 413 and closed the connection
        pass


def test_cli_default_matches_the_server_default() -> None:
    from kvlm.cli.serve import DEFAULT_MAX_REQUEST_BYTES as CLI_DEFAULT

    assert CLI_DEFAULT == DEFAULT_MAX_REQUEST_BYTES


def test_content_length_over_the_limit_is_413_before_the_body(server: LiveServer) -> None:
    with _connect(server.url) as sock:
        sock.sendall(_headers("/v1/completions", f"Content-Length: {HUGE}\r\n"))  # no body
        status, body = _read_response(sock)
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert f"{HUGE:,} bytes" in body["error"]["message"]
    assert "--max-request-bytes" in body["error"]["message"]


def test_chunked_body_over_the_limit_is_413(server: LiveServer) -> None:
    with _connect(server.url) as sock:
        sender = threading.Thread(target=_send_chunked, args=(sock, "/v1/completions", HUGE))
        sender.start()
        status, body = _read_response(sock)
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(30)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert f"more than {DEFAULT_MAX_REQUEST_BYTES:,} bytes" in body["error"]["message"]


def _latencies_while(busy: threading.Thread, url: str) -> list[float]:
    """Seconds each normal request took while `busy` ran (at least one request)."""
    latencies = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        busy.start()
        while busy.is_alive() or not latencies:
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            assert client.post("/v1/completions", json=body).status_code == 200
            latencies.append(time.perf_counter() - start)
    busy.join()
    return latencies


def test_normal_requests_answer_within_1s_while_30MB_is_refused(server: LiveServer) -> None:
    result: dict[str, int] = {}

    def huge() -> None:
        with _connect(server.url) as sock:
            sender = threading.Thread(target=_send_chunked, args=(sock, "/v1/completions", HUGE))
            sender.start()
            result["status"] = _read_response(sock)[0]
            sock.shutdown(socket.SHUT_RDWR)
            sender.join(30)

    latencies = _latencies_while(threading.Thread(target=huge), server.url)
    assert result["status"] == 413
    assert max(latencies) < 1.0, latencies


@pytest.fixture(scope="module")
def roomy(server: LiveServer) -> Iterator[str]:
    """A second app on the same engine that accepts 64 MiB bodies: the prompt checks alone
    must then keep a 30 MB prompt from freezing anyone."""
    app = build_app(server.engine, MODEL_NAME, API_KEY, max_request_bytes=64 * 1024 * 1024)
    thread = ServerThread(app, bind_socket("127.0.0.1", 0))
    thread.start()
    try:
        yield thread.url
    finally:
        thread.stop()


def _post_in_thread(url: str, body: dict, result: dict) -> threading.Thread:
    def post() -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        start = time.perf_counter()
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
        result["seconds"] = time.perf_counter() - start
        result["status"], result["error"] = response.status_code, response.json()["error"]

    return threading.Thread(target=post)


def test_30MB_prompt_is_refused_by_length_without_tokenizing(roomy: str) -> None:
    result: dict = {}
    body = {"model": MODEL_NAME, "prompt": "a" * HUGE, "max_tokens": 1}
    latencies = _latencies_while(_post_in_thread(roomy, body, result), roomy)
    assert result["status"] == 400 and result["error"]["param"] == "prompt"
    assert f"{HUGE:,} characters" in result["error"]["message"]
    assert "8,192 tokens" in result["error"]["message"]
    assert result["seconds"] < 10  # tokenizing 30 MB takes about a minute here
    assert max(latencies) < 1.0, latencies


def test_long_prompt_is_tokenized_off_the_event_loop(roomy: str) -> None:
    # Under the length bound, so it is tokenized (~1 s), then refused by the engine.
    result: dict = {}
    body = {"model": MODEL_NAME, "prompt": "hello world, " * 45_000, "max_tokens": 1}
    latencies = _latencies_while(_post_in_thread(roomy, body, result), roomy)
    assert result["status"] == 400 and "8,192" in result["error"]["message"]
    assert max(latencies) < 1.0, latencies
