"""Sampling fields over HTTP do what they say: logit_bias, presence/frequency penalties,
min_tokens and echo (each checked against a greedy run without it)."""

from __future__ import annotations

import httpx
import pytest
from live_server import MODEL_NAME, LiveServer

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def http(server: LiveServer) -> httpx.Client:
    with server.client() as client:
        yield client


def _complete(http: httpx.Client, **fields: object) -> dict:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _token_ids(server: LiveServer, text: str) -> list[int]:
    return server.engine.tokenizer.encode(text, add_special_tokens=False)


def test_logit_bias_plus_100_forces_a_token(http: httpx.Client, server: LiveServer) -> None:
    (banana,) = _token_ids(server, " banana")
    choice = _complete(http, logit_bias={str(banana): 100}, ignore_eos=True)["choices"][0]
    assert choice["text"] == " banana" * 6


def test_logit_bias_minus_100_bans_the_greedy_token(http: httpx.Client, server: LiveServer) -> None:
    greedy = _complete(http, max_tokens=1)["choices"][0]["text"]
    (first,) = _token_ids(server, greedy)
    banned = _complete(http, max_tokens=1, logit_bias={str(first): -100})["choices"][0]["text"]
    assert banned != greedy
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}
    base = http.post("/v1/chat/completions", json={**chat, "max_tokens": 1, "temperature": 0})
    text = base.json()["choices"][0]["message"]["content"]
    biased = http.post(
        "/v1/chat/completions",
        json={**chat, "max_tokens": 1, "temperature": 0,
              "logit_bias": {str(i): -100 for i in _token_ids(server, text)}},
    )  # fmt: skip
    assert biased.status_code == 200 and biased.json()["choices"][0]["message"]["content"] != text


def test_frequency_and_presence_penalties_reduce_repetition(
    http: httpx.Client, server: LiveServer
) -> None:
    def distinct_tokens(**fields: object) -> tuple[str, int]:
        body = {"prompt": "one one one one one one one one", "max_tokens": 12, "ignore_eos": True}
        text = _complete(http, **body, **fields)["choices"][0]["text"]
        return text, len(set(_token_ids(server, text)))

    plain, num_plain = distinct_tokens()
    for field in ("frequency_penalty", "presence_penalty"):
        penalised, num_penalised = distinct_tokens(**{field: 2.0})
        assert num_penalised > num_plain, (field, plain, penalised)


def test_min_tokens_keeps_eos_away(http: httpx.Client) -> None:
    chat = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Reply with the single word OK."}],
        "temperature": 0,
        "max_tokens": 40,
    }
    short = http.post("/v1/chat/completions", json=chat).json()
    assert short["choices"][0]["finish_reason"] == "stop"
    num_short = short["usage"]["completion_tokens"]
    longer = http.post("/v1/chat/completions", json={**chat, "min_tokens": num_short + 5}).json()
    assert longer["usage"]["completion_tokens"] >= num_short + 5


def test_echo_prepends_the_prompt(http: httpx.Client) -> None:
    plain = _complete(http)["choices"][0]["text"]
    assert _complete(http, echo=True)["choices"][0]["text"] == PROMPT + plain
    ids = _complete(http, prompt=[1, 2, 3], echo=True, max_tokens=1)
    assert ids["usage"]["prompt_tokens"] == 3
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    with http.stream("POST", "/v1/completions", json={**body, "echo": True, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    texts = [httpx.Response(200, content=e[6:]).json()["choices"][0]["text"] for e in events]
    assert texts[0] == PROMPT and "".join(texts) == PROMPT + plain
