"""The benchmark's HTTP client against a scripted server-sent-events stream."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvlm.bench.client import ClientError, completion_body, run_streams, stream_completion


class _Handler(BaseHTTPRequestHandler):
    """Streams 3 text chunks then a usage chunk, as kvlm and llama-server do; 400 for 'bad'."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["prompt"] == "bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "no"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [{"choices": [{"text": t}]} for t in ("a", "", "b", "c")]  # "" is not a token
        events.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_stream_is_timed_chunk_by_chunk(url: str) -> None:
    timing = stream_completion(url, completion_body("hi", 3, "m"))
    assert timing.num_tokens == 3  # from usage
    assert len(timing.chunk_times) == 3  # the empty chunk is not a token
    assert len(timing.inter_token_s) == 2 and min(timing.inter_token_s) >= 0
    assert timing.sent < timing.chunk_times[0] <= timing.finished
    assert timing.ttft_s > 0


def test_body_asks_for_a_fixed_greedy_length() -> None:
    body = completion_body("hi", 7, "m")
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True
    assert body["temperature"] == 0.0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_concurrent_streams_and_errors(url: str) -> None:
    timings = run_streams(url, [completion_body(f"p{i}", 2, "m") for i in range(5)])
    assert [t.num_tokens for t in timings] == [2] * 5
    with pytest.raises(ClientError, match="1 of 2 streams failed: .* answered 400"):
        run_streams(url, [completion_body("ok", 2, "m"), completion_body("bad", 2, "m")])
