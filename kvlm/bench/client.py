"""One HTTP client for every server a benchmark drives: streamed OpenAI completions, timed.

Standard library only (`http.client` on threads), so `kvlm bench serve` needs nothing beyond
kvlm's own dependencies and treats kvlm and llama-server exactly alike: same request body, same
parsing, same clock. Each stream is one thread; they start together behind a barrier.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


class ClientError(RuntimeError):
    """A server answered a benchmark request with an error, or broke off the stream."""


@dataclass(frozen=True)
class StreamTiming:
    """One streamed completion, seconds on this process's `perf_counter`."""

    sent: float
    chunk_times: tuple[float, ...]  # arrival of every chunk that carried text
    finished: float
    num_tokens: int  # the server's usage.completion_tokens, else the text chunks counted

    @property
    def ttft_s(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def inter_token_s(self) -> list[float]:
        """Gaps between successive text chunks (one chunk per token on both servers)."""
        times = self.chunk_times
        return [b - a for a, b in zip(times[:-1], times[1:], strict=True)]


def completion_body(prompt: str, max_tokens: int, model: str) -> dict:
    """Greedy, exactly `max_tokens` tokens (EOS ignored: kvlm and llama-server both honour
    `ignore_eos`), streamed with a final usage chunk."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def stream_completion(url: str, body: dict, timeout_s: float = 600.0) -> StreamTiming:
    """POST `body` to `url`/v1/completions and read its server-sent events to the end."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        sent = time.perf_counter()
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        if response.status != 200:
            raise ClientError(f"{url} answered {response.status}: {response.read()[:300]!r}")
        chunk_times: list[float] = []
        usage_tokens = None
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("choices") and event["choices"][0].get("text"):
                chunk_times.append(time.perf_counter())
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
        finished = time.perf_counter()
    finally:
        conn.close()
    if not chunk_times:
        raise ClientError(f"{url} streamed no text for {body['max_tokens']} tokens")
    num_tokens = usage_tokens if usage_tokens is not None else len(chunk_times)
    return StreamTiming(sent, tuple(chunk_times), finished, num_tokens)


def run_streams(url: str, bodies: list[dict]) -> list[StreamTiming]:
    """Send every body at once, one thread each; returns their timings in order."""
    barrier = threading.Barrier(len(bodies))
    results: list[StreamTiming | BaseException | None] = [None] * len(bodies)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stream_completion(url, bodies[i])
        except BaseException as e:  # handed to the caller below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise ClientError(f"{len(errors)} of {len(bodies)} streams failed: {errors[0]}")
    return [r for r in results if isinstance(r, StreamTiming)]
