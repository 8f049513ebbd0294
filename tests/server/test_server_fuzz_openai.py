"""schemathesis against kvlm with OpenAI's own specification of POST /v1/completions and
/v1/chat/completions (`openai_spec.fuzz_document` says what it changes and why): no request
OpenAI's schema describes, nor one that breaks it, gets a server error; a refusal is a 4xx
error object that names the problem; and a field OpenAI defines that kvlm does not honour is
never answered 200 but refused with a 400 naming it.

The default run makes a few dozen requests per route and mode; `test_long_fuzz_run` (slow)
makes hundreds.
"""

from __future__ import annotations

import collections
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from live_server import API_KEY, MODEL_NAME, LiveServer
from openai_spec import FUZZ_SETTINGS, REQUEST_SCHEMAS, fuzz_document
from schemathesis.config import SchemathesisConfig

from kvlm.server.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    UNSUPPORTED_STREAM_OPTIONS,
    Unsupported,
)

ROUTES = {
    "/v1/completions": (UNSUPPORTED_COMPLETION, {"prompt": "Hi"}),
    "/v1/chat/completions": (UNSUPPORTED_CHAT, {"messages": [{"role": "user", "content": "Hi"}]}),
}


def _refused_fields(body: dict[str, Any], table: dict[str, Unsupported]) -> dict[str, Any]:
    """The top-level and stream_options fields of `body` that kvlm must refuse by name."""
    refused = {k: v for k, v in body.items() if k in table and not table[k].neutral(v)}
    options = body.get("stream_options")
    if isinstance(options, dict):
        refused |= {
            f"stream_options.{k}": v
            for k, v in options.items()
            if k in UNSUPPORTED_STREAM_OPTIONS and not UNSUPPORTED_STREAM_OPTIONS[k].neutral(v)
        }
    return refused


def _check_answer(body: Any, response: Any, table: dict, fields: set[str]) -> None:
    status = response.status_code
    assert status < 500, f"server error {status} for {body!r}: {response.text}"
    assert 200 <= status < 300 or 400 <= status < 500, (status, body)
    if status < 300:
        refused = _refused_fields(body, table) if isinstance(body, dict) else {}
        assert not refused, f"answered {status} though kvlm honours none of {refused}"
        if isinstance(body, dict) and body.get("stream") is True:
            assert not response.stream_cut_short, "the fuzzer stopped reading: raise the cap"
            assert response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
            assert '"error"' not in response.text, response.text
        else:
            assert response.json()["choices"], response.text
        return
    error = response.json()["error"]
    assert error["message"], response.text
    if error["param"] is not None:  # a field of the body, or one OpenAI's request defines
        known = set(body) if isinstance(body, dict) else set()
        assert error["param"].split(".")[0] in known | set(fields), (body, error)


def _check_refused_alone(http: httpx.Client, path: str, name: str, value: Any) -> None:
    """The field with the value the fuzzer made, in an otherwise valid request: 400 naming it."""
    _, minimal = ROUTES[path]
    body: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 1, **minimal}
    if name.startswith("stream_options."):
        body |= {"stream": True, "stream_options": {name.split(".", 1)[1]: value}}
    else:
        body[name] = value
    response = http.post(path, json=body)
    assert response.status_code == 400, (body, response.text)
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (name, "unsupported_parameter"), error
    assert name in error["message"]


_MODEL = {"type": "string", "enum": [MODEL_NAME]}  # else nearly every body names another model
_MESSAGE = "#/components/schemas/ChatCompletionRequest{}Message"
_TOKENS = {"type": "integer", "minimum": 1, "maximum": 8}  # the fuzz server's context is short
_TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": 255}  # in every model's vocabulary
_TEXT = {"type": "string", "minLength": 1, "maxLength": 40}
_PROMPT_IDS = {"type": "array", "minItems": 1, "maxItems": 8, "items": _TOKEN_ID}
# Where kvlm accepts less than OpenAI's schema allows (few completions per prompt, a schema the
# grammar engine compiles, ...), so that requests reach the model; each is refused by name
# elsewhere. Prompts come in every shape OpenAI takes (a text, token ids, a list of either),
# few and short, and `echo` with `logprobs` (the prompt scored) is honoured.
_KVLM_RANGES = {
    "n": {"type": "integer", "minimum": 1, "maximum": 3},
    "best_of": {"type": "integer", "minimum": 1, "maximum": 4},
    "max_tokens": _TOKENS,
    "max_completion_tokens": _TOKENS,
    "prompt": {
        "oneOf": [
            _TEXT,
            _PROMPT_IDS,
            {"type": "array", "minItems": 2, "maxItems": 3, "items": _TEXT},
            {"type": "array", "minItems": 2, "maxItems": 3, "items": _PROMPT_IDS},
        ]
    },
    "messages": {
        "type": "array",
        "minItems": 1,
        "maxItems": 4,
        "items": {"oneOf": [{"$ref": _MESSAGE.format(r)} for r in ("System", "Developer", "User")]},
    },
    # structured outputs with a schema llguidance compiles (OpenAI's allows any object)
    "response_format": {
        "oneOf": [
            {"type": "object", "required": ["type"], "properties": {"type": {"const": t}}}
            for t in ("text", "json_object")
        ]
        + [
            {
                "type": "object",
                "required": ["type", "json_schema"],
                "properties": {
                    "type": {"const": "json_schema"},
                    "json_schema": {
                        "type": "object",
                        "required": ["name", "schema"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                            "schema": {
                                "const": {
                                    "type": "object",
                                    "properties": {"a": {"type": "integer"}},
                                }
                            },
                            "strict": {"type": "boolean"},
                        },
                    },
                },
            }
        ],
    },  # fmt: skip
    # tools need a system prompt longer than the fuzz server's 48-token context: the positive
    # mode sends them (OpenAI's whole schema), this one leaves them out
    "tools": None,
    "tool_choice": None,
    "parallel_tool_calls": None,
}
_REFUSED = {*UNSUPPORTED_COMPLETION, *UNSUPPORTED_CHAT}
# mode -> (schemathesis's generation mode, the request properties fuzz_document replaces)
MODES = {
    "positive": ("positive", {"model": _MODEL}),  # OpenAI's whole request schema
    # only what kvlm honours, in its ranges: reaches the model
    "honoured": ("positive", {"model": _MODEL, **_KVLM_RANGES, **dict.fromkeys(_REFUSED)}),
    "negative": ("negative", {"model": _MODEL}),  # bodies that break OpenAI's schema
}


def fuzz(server: LiveServer, path: str, mode: str, max_examples: int) -> collections.Counter:
    """Run schemathesis on one route; returns how often each status was answered."""
    generation, replace = MODES[mode]
    document = fuzz_document(replace)
    # schemathesis stops reading a stream after 20 events; the short context keeps ours shorter
    config = SchemathesisConfig.from_dict({"max-stream-events": 1000})
    operation = schemathesis.openapi.from_dict(document, config=config)[path]["POST"]
    strategy = operation.as_strategy(schemathesis.GenerationMode(generation))
    body_schema = REQUEST_SCHEMAS[path.removeprefix("/v1")]
    fields = set(document["components"]["schemas"][body_schema]["properties"])
    table, _ = ROUTES[path]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    statuses: collections.Counter = collections.Counter()
    refusals: collections.Counter = collections.Counter()  # by the param the error names
    refused_alone: set[str] = set()

    @settings(FUZZ_SETTINGS, max_examples=max_examples)
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.url, headers=headers, timeout=60)
        statuses[response.status_code] += 1
        _check_answer(case.body, response, table, fields)
        if response.status_code >= 400:
            refusals[str(response.json()["error"]["param"])] += 1
        if generation == "positive":
            for name, value in _refused_fields(case.body, table).items():
                _check_refused_alone(http, path, name, value)
                refused_alone.add(name)

    with server.client() as http:
        run()
    assert not server.errors, [r.getMessage() for r in server.errors]
    print(
        f"\n{path} {mode}: {statuses.total()} requests, statuses {dict(sorted(statuses.items()))}"
        f", refusals by param {dict(refusals.most_common())}"
        + (f", refused alone: {sorted(refused_alone)}" if refused_alone else "")
    )
    return statuses


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("mode", list(MODES))
def test_openai_specification_finds_no_server_error(
    fuzz_server: LiveServer, path: str, mode: str
) -> None:
    statuses = fuzz(fuzz_server, path, mode, max_examples=25)
    assert statuses.total() >= 25
    if mode == "honoured":
        assert statuses[200] >= 5, "few requests got through: the model was hardly fuzzed"


@pytest.mark.slow
@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("mode", list(MODES))
def test_long_fuzz_run(fuzz_server: LiveServer, path: str, mode: str) -> None:
    statuses = fuzz(fuzz_server, path, mode, max_examples=400)
    assert statuses.total() >= 400


def test_fuzz_document_is_openais_flat_and_closed() -> None:
    document = fuzz_document({"model": _MODEL, "tools": None})
    assert set(document["paths"]) == set(ROUTES)
    chat = document["components"]["schemas"]["CreateChatCompletionRequest"]
    assert "allOf" not in chat and chat["additionalProperties"] is False
    assert chat["required"] == ["messages", "model"]
    assert chat["properties"]["model"] == _MODEL and "tools" not in chat["properties"]
    # from both parts of OpenAI's allOf
    assert {"messages", "response_format", "top_logprobs", "temperature"} <= set(chat["properties"])
    message = document["components"]["schemas"]["ChatCompletionRequestUserMessage"]
    assert message["additionalProperties"] is False


def test_integers_and_seeds_as_openais_schema_allows(fuzz_server: LiveServer) -> None:
    """What the fuzzer found refused though OpenAI's schema allows it: `4.0` is an integer
    (JSON Schema's), and seeds are signed 64-bit (-1 is the seed 2**64 - 1)."""
    body = {"model": MODEL_NAME, "prompt": [1.0, 2.0], "temperature": 1.0, "ignore_eos": True}
    with fuzz_server.client() as http:
        answers = [
            http.post("/v1/completions", json=body | fields)
            for fields in ({"max_tokens": 4.0, "seed": -1}, {"max_tokens": 4, "seed": 2**64 - 1})
        ]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    first, second = (a.json() for a in answers)
    assert (first["usage"]["prompt_tokens"], first["usage"]["completion_tokens"]) == (2, 4)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
