"""`/v1/completions` with `echo` and `logprobs` (the prompt scored, OpenAI's legacy shape) and
with several prompts per request (one choice each, prompt-major), over HTTP on the live float
server: each prompt token's log-probability equals offline scoring on the exact path, also when
the texts share cached prefixes and when several share one request."""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
import pytest
import torch
from live_server import MODEL_NAME, LiveServer
from scoring_texts import TEXTS

from kvlm.engine.scoring import token_logprobs

TOLERANCE = 1e-4  # float32, batched differently from the offline run


@pytest.fixture(scope="module")
def http(server: LiveServer) -> httpx.Client:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def ids(server: LiveServer) -> list[list[int]]:
    return [server.engine.tokenizer.encode(text) for text in TEXTS]


@pytest.fixture(scope="module")
def offline(smollm2_llm, ids: list[list[int]]) -> list[torch.Tensor]:
    """Each text scored offline on an engine with the server's weights (float)."""
    return [token_logprobs(smollm2_llm.engine, token_ids) for token_ids in ids]


def _complete(http: httpx.Client, **fields: object) -> dict:
    body = {"model": MODEL_NAME, "temperature": 0, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _assert_scored(logprobs: dict, token_ids: list[int], expected: torch.Tensor, k: int) -> None:
    """The legacy object starting with a prompt's entries: nulls for its first token, then
    its logprobs as scored offline."""
    assert len(logprobs["tokens"]) >= len(token_ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    got = torch.tensor(logprobs["token_logprobs"][1 : len(token_ids)], dtype=torch.float64)
    assert torch.allclose(got, expected.double(), atol=TOLERANCE, rtol=0), (
        (got - expected.double()).abs().max()
    )
    for top in logprobs["top_logprobs"][1 : len(token_ids)]:
        assert k <= len(top) <= k + 1  # the top k, and the token itself if not among them
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_echo_max_tokens_0_scores_the_prompt_also_when_cached(
    http: httpx.Client, server: LiveServer, ids: list[list[int]], offline: list[torch.Tensor]
) -> None:
    for _ in range(2):  # the second time, every block of the texts is cached
        for token_ids, expected in zip(ids, offline, strict=True):
            out = _complete(http, prompt=token_ids, echo=True, logprobs=2, max_tokens=0)
            [choice] = out["choices"]
            assert choice["text"] == server.engine.tokenizer.decode(
                token_ids, skip_special_tokens=False
            )
            assert choice["finish_reason"] == "length"
            _assert_scored(choice["logprobs"], token_ids, expected, 2)
            assert len(choice["logprobs"]["tokens"]) == len(token_ids)  # nothing generated
            assert out["usage"]["prompt_tokens"] == len(token_ids)
            assert out["usage"]["completion_tokens"] == 0
    server.check_integrity()


def test_several_prompts_scored_in_one_request(
    http: httpx.Client, ids: list[list[int]], offline: list[torch.Tensor]
) -> None:
    out = _complete(http, prompt=[ids[1], ids[0]], echo=True, logprobs=0, max_tokens=0)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice, token_ids, expected in zip(out["choices"], ids[::-1], offline[::-1], strict=True):
        _assert_scored(choice["logprobs"], token_ids, expected, 0)
        assert len(choice["logprobs"]["tokens"]) == len(token_ids)
    assert out["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])


def test_echo_with_generated_tokens(
    http: httpx.Client, ids: list[list[int]], offline: list[torch.Tensor]
) -> None:
    plain = _complete(http, prompt=ids[0], logprobs=1, max_tokens=3, ignore_eos=True)
    echoed = _complete(http, prompt=ids[0], echo=True, logprobs=1, max_tokens=3, ignore_eos=True)
    [p], [e] = plain["choices"], echoed["choices"]
    n = len(ids[0])
    echo = e["text"][: len(e["text"]) - len(p["text"])]
    assert e["text"] == echo + p["text"] and echo
    _assert_scored(e["logprobs"], ids[0], offline[0], 1)
    assert e["logprobs"]["tokens"][n:] == p["logprobs"]["tokens"]
    assert e["logprobs"]["token_logprobs"][n:] == pytest.approx(
        p["logprobs"]["token_logprobs"], abs=TOLERANCE
    )
    # the completion's offsets point into the returned text, after the echoed prompt
    assert [o - len(echo) for o in e["logprobs"]["text_offset"][n:]] == p["logprobs"]["text_offset"]
    assert echoed["usage"]["completion_tokens"] == 3


def _stream(http: httpx.Client, **fields: object) -> list[dict]:
    body = {"model": MODEL_NAME, "temperature": 0, "stream": True, **fields}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_stream_sends_the_prompt_logprobs_first(
    http: httpx.Client, ids: list[list[int]], offline: list[torch.Tensor]
) -> None:
    whole = _complete(http, prompt=ids[1], echo=True, logprobs=2, max_tokens=4)["choices"][0]
    chunks = _stream(http, prompt=ids[1], echo=True, logprobs=2, max_tokens=4)
    first = chunks[0]["choices"][0]
    _assert_scored(first["logprobs"], ids[1], offline[1], 2)
    assert len(first["logprobs"]["tokens"]) == len(ids[1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    joined = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert joined == whole["logprobs"]["tokens"]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]


def test_stream_of_a_scored_prompt_alone(
    http: httpx.Client, server: LiveServer, ids: list[list[int]], offline: list[torch.Tensor]
) -> None:
    chunks = _stream(
        http,
        prompt=ids[0],
        echo=True,
        logprobs=1,
        max_tokens=0,
        stream_options={"include_usage": True},
    )
    choices = [c["choices"][0] for c in chunks[:-1]]
    _assert_scored(choices[0]["logprobs"], ids[0], offline[0], 1)
    assert "".join(c["text"] for c in choices) == server.engine.tokenizer.decode(
        ids[0], skip_special_tokens=False
    )
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert all(c["logprobs"]["tokens"] == [] for c in choices[1:])  # nothing generated
    assert chunks[-1]["usage"]["completion_tokens"] == 0


PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is"]


def test_several_text_prompts_answer_in_prompt_order(http: httpx.Client) -> None:
    alone = [_complete(http, prompt=p, max_tokens=5, ignore_eos=True) for p in PROMPTS]
    together = _complete(http, prompt=PROMPTS, max_tokens=5, ignore_eos=True)
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    assert [c["text"] for c in together["choices"]] == [a["choices"][0]["text"] for a in alone]
    usage = together["usage"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage[key] == sum(a["usage"][key] for a in alone)
    assert usage["completion_tokens"] == 15


def test_several_prompts_stream_interleaved_by_index(http: httpx.Client) -> None:
    whole = _complete(http, prompt=PROMPTS, max_tokens=5, ignore_eos=True, echo=True)
    chunks = _stream(
        http,
        prompt=PROMPTS,
        max_tokens=5,
        ignore_eos=True,
        echo=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = defaultdict(str)
    finished = []
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finished.append(choice["index"])
    assert sorted(finished) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [c["text"] for c in whole["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_disconnect_aborts_every_prompt(http: httpx.Client, server: LiveServer) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPTS, "max_tokens": 500, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        next(response.iter_lines())  # the first chunk came: every prompt is in the engine
    m = server.wait_idle()
    assert m["kvlm_num_requests_running"] == 0 and m["kvlm_kv_cache_blocks_used"] == 0
    server.check_integrity()


BAD = [
    ({"prompt": []}, "prompt", ["prompt is empty"]),
    ({"prompt": ["Hi", ""]}, "prompt.1", ["prompt.1 is empty"]),
    ({"prompt": [[1, 2], []]}, "prompt.1", ["prompt.1 is empty"]),
    ({"prompt": ["Hi", [1, 2]]}, "prompt", ["mixes", "list", "str"]),
    ({"prompt": [1, "Hi"]}, "prompt", ["mixes"]),
    ({"prompt": [[1, 2.5]]}, "prompt.0", ["2.5"]),
    ({"prompt": ["Hi", [1, 10**9]]}, "prompt", ["mixes"]),
    ({"prompt": [[1, 2], [1, 10**9]]}, "prompt.1", ["1000000000", "49152"]),
    ({"echo": True, "logprobs": 21}, "logprobs", ["logprobs", "[0, 20]", "21"]),
    ({"echo": True, "logprobs": -1}, "logprobs", ["logprobs", "-1"]),
    ({"max_tokens": 0}, "max_tokens", ["max_tokens", "0", "echo"]),
    ({"max_tokens": -1, "echo": True}, "max_tokens", ["max_tokens", "-1"]),
]


@pytest.mark.parametrize(("fields", "param", "words"), BAD)
def test_refusals_name_the_field(
    http: httpx.Client, server: LiveServer, fields: dict, param: str, words: list[str]
) -> None:
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    assert server.wait_idle()["kvlm_kv_cache_blocks_used"] == 0  # a refused prompt's siblings


def test_echo_is_not_a_chat_field(http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "echo": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "echo"
