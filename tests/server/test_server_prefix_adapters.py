"""Prefix adapters over HTTP: the `prefix_adapter` field, the model name 'served:adapter',
/v1/models, and clear refusals. A server of its own (the shared one loads no adapter)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from live_server import API_KEY, MODEL_NAME, LiveServer
from peft_adapters import write_adapter

from kvlm import LLM, SamplingParams
from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.config import EngineConfig
from kvlm.engine.engine import LLMEngine
from kvlm.loading.gguf_loader import read_header
from kvlm.server import build_app
from kvlm.server.launch import ServerThread, bind_socket

PROMPT = "The three primary colours are"
SETTINGS = {"kv_cache_memory": "64MiB", "max_model_len": 256}


@pytest.fixture(scope="module")
def adapters(smollm2_path, tmp_path_factory) -> dict[str, str]:
    config = read_header(smollm2_path)[0]
    root = tmp_path_factory.mktemp("server_adapters")
    return {
        "poet": str(write_adapter(root / "poet", config, 20, seed=5)),
        "coder": str(write_adapter(root / "coder", config, 9, seed=6)),
    }


@pytest.fixture(scope="module")
def adapter_server(adapters) -> Iterator[LiveServer]:
    config = EngineConfig(model="smollm2", prefix_adapters=adapters, **SETTINGS)
    engine = AsyncLLMEngine(LLMEngine(config))
    thread = ServerThread(build_app(engine, MODEL_NAME, API_KEY), bind_socket("127.0.0.1", 0))
    thread.start()
    try:
        yield LiveServer(thread.url, engine)
    finally:
        thread.stop()
        engine.shutdown()


@pytest.fixture(scope="module")
def http(adapter_server: LiveServer) -> Iterator[httpx.Client]:
    with adapter_server.client() as client:
        yield client


def _complete(http: httpx.Client, **fields) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    body["ignore_eos"] = True
    return http.post("/v1/completions", json={**body, **fields})


def test_adapter_by_field_and_by_model_name_match_the_offline_api(http, adapters):
    by_field = _complete(http, prefix_adapter="poet")
    by_name = _complete(http, model=f"{MODEL_NAME}:poet")
    plain = _complete(http)
    assert by_field.status_code == by_name.status_code == plain.status_code == 200
    texts = [r.json()["choices"][0]["text"] for r in (by_field, by_name, plain)]
    assert texts[0] == texts[1] != texts[2]
    assert by_field.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    llm = LLM("smollm2", prefix_adapters=adapters, **SETTINGS)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert llm.generate(PROMPT, params, prefix_adapter="poet")[0].outputs[0].text == texts[0]


def test_chat_takes_an_adapter(http):
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"model": f"{MODEL_NAME}:coder", "messages": messages, "max_tokens": 4}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


def test_models_lists_each_adapter(http):
    ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
    assert ids == [MODEL_NAME, f"{MODEL_NAME}:coder", f"{MODEL_NAME}:poet"]


@pytest.mark.parametrize(
    ("fields", "status", "param", "message"),
    [
        ({"prefix_adapter": "nope"}, 404, "prefix_adapter", "prefix adapter 'nope' does not exist"),
        ({"model": f"{MODEL_NAME}:nope"}, 404, "model", "'smollm2:coder', 'smollm2:poet'"),
        ({"model": "other:poet"}, 400, "model", "model 'other:poet' does not exist"),
        (
            {"model": f"{MODEL_NAME}:poet", "prefix_adapter": "coder"},
            400,
            "prefix_adapter",
            "give the adapter once",
        ),
    ],
)
def test_bad_adapter_requests_are_refused(http, fields, status, param, message):
    response = _complete(http, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_a_server_without_adapters_refuses_one(server: LiveServer):
    with server.client() as client:
        response = _complete(client, prefix_adapter="poet")
    assert response.status_code == 404
    assert "serves no adapters (start it with --prefix-adapter NAME=PATH)" in response.text
