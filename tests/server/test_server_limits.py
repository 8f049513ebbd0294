"""One request cannot freeze the server: bodies over --max-request-bytes are refused (413)
before they are read, prompts that cannot fit are refused before tokenizing, and tokenizing
runs off the event loop, so other clients keep being served meanwhile. Progress is asserted by
order (normal requests answered while the big one is pending), never in seconds."""

from __future__ import annotations

import json
import socket
import threading
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


def _send_chunked(
    sock: socket.socket,
    path: str,
    body: bytes,
    pause_at: int | None = None,
    paused: threading.Event | None = None,
    go: threading.Event | None = None,
) -> None:
    """`body` in chunks until the server stops reading. With `pause_at`: once the chunks
    before that byte are sent, set `paused` and send nothing more until `go` is set."""
    sock.sendall(_headers(path, "Transfer-Encoding: chunked\r\n"))
    try:
        for start in range(0, len(body), CHUNK):
            if pause_at is not None and start >= pause_at:
                assert paused is not None and go is not None
                paused.set()
                go.wait(120)
                pause_at = None
            piece = body[start : start + CHUNK]
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server answered 413 and closed the connection
        pass


def _prompt_body(num_chars: int, **fields) -> bytes:
    """A JSON body whose prompt is `num_chars` times "a", beside `fields`."""
    return json.dumps({**fields, "prompt": "a" * num_chars}).encode()


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
        body = _prompt_body(HUGE)
        sender = threading.Thread(target=_send_chunked, args=(sock, "/v1/completions", body))
        sender.start()
        status, error = _read_response(sock)
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(30)
    assert status == 413 and error["error"]["code"] == "request_too_large"
    assert f"more than {DEFAULT_MAX_REQUEST_BYTES:,} bytes" in error["error"]["message"]


def _serve_normal_requests(url: str, count: int, done: list[str] | None = None) -> None:
    """`count` health checks and 2-token completions, each answered 200 (appends "small" to
    `done` after each)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for _ in range(count):
            assert client.get("/health").status_code == 200
            assert client.post("/v1/completions", json=body).status_code == 200
            if done is not None:
                done.append("small")


def _paused_upload(url: str, body: bytes, pause_at: int) -> tuple[threading.Thread, dict]:
    """A thread sending `body` chunked, held at `pause_at` bytes: `result["paused"]` is set
    there, it goes on once `result["go"]` is set, and `result["response"]` comes last."""
    result: dict = {"go": threading.Event(), "paused": threading.Event()}

    def upload() -> None:
        with _connect(url) as sock:
            args = (sock, "/v1/completions", body, pause_at, result["paused"], result["go"])
            sender = threading.Thread(target=_send_chunked, args=args)
            sender.start()
            result["response"] = _read_response(sock)
            sock.shutdown(socket.SHUT_RDWR)
            sender.join(30)

    return threading.Thread(target=upload), result


def test_normal_requests_are_served_while_30MB_streams_in_then_is_refused(
    server: LiveServer,
) -> None:
    """A 30 MB upload is held just under the 8 MiB limit while normal requests come and go:
    every one of them is answered before the big one is refused."""
    upload, result = _paused_upload(
        server.url, _prompt_body(HUGE), DEFAULT_MAX_REQUEST_BYTES - CHUNK
    )
    upload.start()
    assert result["paused"].wait(60)
    _serve_normal_requests(server.url, 3)
    assert "response" not in result  # still pending: the limit is not crossed yet
    result["go"].set()
    upload.join(60)
    status, error = result["response"]
    assert status == 413 and error["error"]["code"] == "request_too_large"


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


def test_30MB_prompt_is_refused_by_length_without_tokenizing(roomy: str) -> None:
    """Normal requests are served while the body streams in; then the prompt is refused by
    its length in characters (the check that runs before tokenizing), and they still are."""
    body = _prompt_body(HUGE, model=MODEL_NAME, max_tokens=1)
    upload, result = _paused_upload(roomy, body, HUGE // 2)
    upload.start()
    assert result["paused"].wait(60)
    _serve_normal_requests(roomy, 3)
    assert "response" not in result
    result["go"].set()
    upload.join(120)
    status, error = result["response"]
    assert status == 400 and error["error"]["param"] == "prompt"
    assert f"prompt is {HUGE:,} characters" in error["error"]["message"]
    assert "8,192 tokens" in error["error"]["message"]
    _serve_normal_requests(roomy, 1)


def test_long_prompt_is_tokenized_off_the_event_loop(roomy: str) -> None:
    """Under the length bound, so it is tokenized (about a second), then refused by the engine.
    A normal request sent once the whole long body is out is answered before the long one."""
    order: list[str] = []
    body = json.dumps({"model": MODEL_NAME, "prompt": "hello world, " * 45_000, "max_tokens": 1})
    sent = threading.Event()
    answer: dict = {}

    def post_long() -> None:
        with _connect(roomy) as sock:
            sock.sendall(_headers("/v1/completions", f"Content-Length: {len(body)}\r\n"))
            sock.sendall(body.encode())
            sent.set()
            answer["response"] = _read_response(sock)
            order.append("long")

    long = threading.Thread(target=post_long)
    long.start()
    assert sent.wait(60)
    _serve_normal_requests(roomy, 1, order)
    long.join(120)
    status, error = answer["response"]
    assert status == 400 and "8,192" in error["error"]["message"]
    assert order == ["small", "long"], "the event loop stalled while the long prompt tokenized"
