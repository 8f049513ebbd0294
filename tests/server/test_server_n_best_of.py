"""`n` and `best_of` over HTTP on the live server: choices indexed prompt-major, each choice
equal to a one-completion request seeded seed + index, best_of ranked by cumulative logprob,
streams with per-choice deltas and finish reasons, usage counting each prompt once."""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
import pytest
from live_server import MODEL_NAME, LiveServer

PROMPTS = ["The capital of France is", "Water is made of"]


@pytest.fixture(scope="module")
def http(server: LiveServer) -> httpx.Client:
    with server.client() as client:
        yield client


def _post(http: httpx.Client, route: str, **fields: object) -> dict:
    body = {"model": MODEL_NAME, "max_tokens": 8, "ignore_eos": True, **fields}
    response = http.post(route, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _complete(http: httpx.Client, **fields: object) -> dict:
    return _post(http, "/v1/completions", **fields)


def _events(http: httpx.Client, route: str, **fields: object) -> list[dict]:
    body = {"model": MODEL_NAME, "max_tokens": 8, "ignore_eos": True, "stream": True, **fields}
    response = http.post(route, json=body)
    assert response.status_code == 200, response.text
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _alone(http: httpx.Client, prompt: str, seed: int) -> str:
    return _complete(http, prompt=prompt, seed=seed)["choices"][0]["text"]


def test_n_choices_equal_requests_seeded_seed_plus_index(http: httpx.Client) -> None:
    response = _complete(http, prompt=PROMPTS[0], n=3, seed=21)
    choices = response["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["text"] for c in choices] == [_alone(http, PROMPTS[0], 21 + j) for j in range(3)]
    assert all(c["finish_reason"] == "length" for c in choices)
    usage = response["usage"]
    one = _complete(http, prompt=PROMPTS[0], seed=21)["usage"]
    assert usage["prompt_tokens"] == one["prompt_tokens"]  # the prompt once
    assert usage["completion_tokens"] == 3 * 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 24


def test_several_prompts_are_indexed_prompt_major(http: httpx.Client) -> None:
    response = _complete(http, prompt=PROMPTS, n=2, seed=4)
    choices = response["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(PROMPTS):
        alone = _complete(http, prompt=prompt, n=2, seed=4)["choices"]
        assert [c["text"] for c in choices[2 * i : 2 * i + 2]] == [c["text"] for c in alone]
    prompt_tokens = sum(_complete(http, prompt=p)["usage"]["prompt_tokens"] for p in PROMPTS)
    assert response["usage"]["prompt_tokens"] == prompt_tokens
    assert response["usage"]["completion_tokens"] == 4 * 8


def test_best_of_returns_the_highest_cumulative_logprob(http: httpx.Client) -> None:
    every = _complete(http, prompt=PROMPTS[1], n=4, seed=8, logprobs=0)["choices"]
    score = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in every}
    best = _complete(http, prompt=PROMPTS[1], n=2, best_of=4, seed=8)
    assert [c["index"] for c in best["choices"]] == [0, 1]
    ranked = sorted(score, key=score.__getitem__, reverse=True)
    assert [c["text"] for c in best["choices"]] == ranked[:2]
    assert all(c["logprobs"] is None for c in best["choices"])  # not asked for
    assert best["usage"]["completion_tokens"] == 4 * 8  # every sequence generated


def test_stream_sends_per_choice_deltas_and_finish_reasons(http: httpx.Client) -> None:
    whole = _complete(http, prompt=PROMPTS, n=2, seed=13)["choices"]
    events = _events(
        http, "/v1/completions", prompt=PROMPTS, n=2, seed=13,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list[str]] = defaultdict(list)
    for event in events[:-1]:
        [choice] = event["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finishes[choice["index"]].append(choice["finish_reason"])
    assert dict(texts) == {c["index"]: c["text"] for c in whole}
    assert dict(finishes) == {i: ["length"] for i in range(4)}
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] == 4 * 8


def test_chat_n_choices_whole_and_streamed(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = _post(http, "/v1/chat/completions", messages=messages, n=2, seed=5)
    choices = whole["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert whole["usage"]["completion_tokens"] == 16
    events = _events(http, "/v1/chat/completions", messages=messages, n=2, seed=5)
    content: dict[int, str] = defaultdict(str)
    roles = []
    for event in events:
        [choice] = event["choices"]
        delta = choice["delta"]
        if "role" in delta:
            roles.append(choice["index"])
        content[choice["index"]] += delta.get("content", "")
    assert sorted(roles) == [0, 1]
    assert dict(content) == {c["index"]: c["message"]["content"] for c in choices}


@pytest.fixture(scope="module", autouse=True)
def errors_before(server: LiveServer) -> int:
    """The session server's errors logged before this module (other modules cause some)."""
    return len(server.errors)


def test_the_server_is_idle_and_consistent_afterwards(
    server: LiveServer, errors_before: int
) -> None:
    server.wait_idle()
    server.check_integrity()
    assert server.engine.engine.kv_cache_bytes_used() == 0
    assert server.errors[errors_before:] == [], [r.getMessage() for r in server.errors]
