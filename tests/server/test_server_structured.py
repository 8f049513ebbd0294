"""Structured outputs and tools through the live server, with the official `openai` client:
`chat.completions.parse` with pydantic models, JSON schemas (checked with `jsonschema`),
json_object, regex and choice (vLLM's fields), tools with each tool_choice, streamed and not,
a second turn with the tool's result, and a 400 naming the field for each unusable request."""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from live_server import API_KEY, MODEL_NAME, LiveServer
from pydantic import BaseModel, ConfigDict

GREEDY: dict[str, Any] = {"model": MODEL_NAME, "temperature": 0}


class Kind(str, Enum):
    cat = "cat"
    dog = "dog"


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Kind
    name: str


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    age: int
    pets: list[Pet]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]

_OBJ = {"type": "object", "additionalProperties": False}
SCHEMAS: list[dict[str, Any]] = [
    {**_OBJ, "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    {**_OBJ, "properties": {"colors": {"type": "array", "items": {"enum": ["red", "blue"]},
                                        "minItems": 1, "maxItems": 3}}, "required": ["colors"]},
    {**_OBJ, "properties": {"book": {**_OBJ, "properties": {
        "title": {"type": "string", "maxLength": 40}, "year": {"type": "integer"}},
        "required": ["title", "year"]}}, "required": ["book"]},
    {**_OBJ, "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["n"]},
    {**_OBJ, "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["score"]},
    {**_OBJ, "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                      "maxItems": 4}}, "required": ["tags"]},
    {**_OBJ, "properties": {"city": {"type": "string", "maxLength": 30},
                            "country": {"type": "string", "maxLength": 30}},
     "required": ["city", "country"]},
    {**_OBJ, "properties": {"mood": {"enum": ["happy", "sad", "calm"]}}, "required": ["mood"]},
    {**_OBJ, "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
     "required": ["id"]},
    {**_OBJ, "properties": {"items": {"type": "array", "maxItems": 3, "items": {**_OBJ,
        "properties": {"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer"}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {**_OBJ, "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"],
                                                                  "maxLength": 30}},
     "required": ["ok", "note"]},
    {**_OBJ, "properties": {"point": {"type": "array", "prefixItems": [{"type": "number"},
                                                                       {"type": "number"}],
                                      "items": False, "minItems": 2}}, "required": ["point"]},
    {**_OBJ, "properties": {"level": {"const": "high"}, "value": {"type": "integer"}},
     "required": ["level", "value"]},
    {**_OBJ, "properties": {"email": {"type": "string", "format": "email", "maxLength": 40}},
     "required": ["email"]},
    {**_OBJ, "properties": {"animal": {"anyOf": [
        {**_OBJ, "properties": {"legs": {"type": "integer"}}, "required": ["legs"]},
        {**_OBJ, "properties": {"wings": {"type": "boolean"}}, "required": ["wings"]}]}},
     "required": ["animal"]},
    {**_OBJ, "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer"}}}}, "required": ["matrix"]},
    {**_OBJ, "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]},
    {**_OBJ, "properties": {"first": {"type": "string", "maxLength": 15},
                            "last": {"type": "string", "maxLength": 15},
                            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["first", "last", "age"]},
    {**_OBJ, "properties": {"steps": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
        "type": "string", "maxLength": 25}}}, "required": ["steps"]},
    {**_OBJ, "$defs": {"pt": {**_OBJ, "properties": {"x": {"type": "integer"}},
                              "required": ["x"]}},
     "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
     "required": ["a", "b"]},
]  # fmt: skip


@pytest.fixture(scope="module", params=["server", "gemma3_server"])
def model(request: pytest.FixtureRequest) -> str:
    """Every test runs on both embedded models: SmolLM2 (its GGUF's own chat template) and
    Gemma 3 270M (none in the file: kvlm's built-in Gemma template). The server fixture's name."""
    return request.param


@pytest.fixture(scope="module")
def model_server(model: str, request: pytest.FixtureRequest) -> LiveServer:
    return request.getfixturevalue(model)


# Gemma 3 270M is a base model: greedy, it can write the digits of an unbounded integer until
# max_tokens ("qty": 1000000...), which the grammar allows; a repetition penalty stops that.
PENALTY: dict[str, dict[str, Any]] = {"server": {}, "gemma3_server": {"repetition_penalty": 1.3}}


@pytest.fixture(scope="module")
def greedy(model: str) -> dict[str, Any]:
    """Greedy keyword arguments for the openai client's create / parse."""
    return {**GREEDY, "extra_body": PENALTY[model]}


@pytest.fixture(scope="module")
def greedy_body(model: str) -> dict[str, Any]:
    """Greedy fields of a JSON request body."""
    return {**GREEDY, **PENALTY[model]}


@pytest.fixture(scope="module")
def client(model_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=model_server.base_url, api_key=API_KEY, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def http(model_server: LiveServer) -> httpx.Client:
    with model_server.client() as client:
        yield client


@pytest.mark.parametrize(
    ("name", "origin"), [("server", "model files"), ("gemma3_server", "built-in gemma")]
)
def test_the_model_card_names_the_chat_template(
    request: pytest.FixtureRequest, name: str, origin: str
) -> None:
    with request.getfixturevalue(name).client() as http:
        card = http.get("/v1/models").json()["data"][0]
    assert card["chat_template"] == origin


def test_parse_returns_a_nested_pydantic_object(
    greedy: dict[str, Any], client: openai.OpenAI
) -> None:
    completion = client.chat.completions.parse(
        **greedy,
        messages=[{"role": "user", "content": "Describe a person who has two pets, as JSON."}],
        response_format=Person,
        max_tokens=120,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Person)
    jsonschema.validate(json.loads(choice.message.content), Person.model_json_schema())


def _schema_answers(
    greedy: dict[str, Any], client: openai.OpenAI, schemas: list[dict[str, Any]]
) -> None:
    """Each answer complete ("stop") and valid; the failures are listed together."""
    failures = []
    for i, schema in enumerate(schemas):
        completion = client.chat.completions.create(
            **greedy,
            messages=[{"role": "user", "content": f"Answer in JSON like {json.dumps(schema)}"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
            },
            max_tokens=100,
        )
        choice = completion.choices[0]
        if choice.finish_reason != "stop":
            failures.append((i, choice.finish_reason, choice.message.content))
            continue
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert not failures, failures


def test_three_schemas_are_followed(greedy: dict[str, Any], client: openai.OpenAI) -> None:
    _schema_answers(greedy, client, [SCHEMAS[1], SCHEMAS[9], SCHEMAS[14]])


@pytest.mark.slow
def test_twenty_schemas_are_followed(greedy: dict[str, Any], client: openai.OpenAI) -> None:
    _schema_answers(greedy, client, SCHEMAS)


def test_json_object_regex_and_choice_on_both_routes(
    greedy_body: dict[str, Any], http: httpx.Client
) -> None:
    chat = http.post(
        "/v1/chat/completions",
        json={**greedy_body, "messages": ASK_WEATHER, "max_tokens": 60,
              "response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert isinstance(json.loads(chat.json()["choices"][0]["message"]["content"]), dict)
    bodies = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
            **_OBJ, "properties": {"n": {"type": "integer", "maximum": 99}},
            "required": ["n"]}}}}, lambda t: json.loads(t)["n"] <= 99),
        ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2,6}"}}, None),
        ({"guided_regex": "[0-9]{3}-[a-z]{2,6}"}, None),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}},
                          "required": ["a"]}}, lambda t: isinstance(json.loads(t)["a"], int)),
        ({"guided_grammar": 'start: "x=" /[0-9]{1,4}/'}, lambda t: re.fullmatch(r"x=\d{1,4}", t)),
    ]  # fmt: skip
    for fields, check in bodies:
        body = {**greedy_body, "prompt": "The code is", "max_tokens": 40, **fields}
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
        text = choice["text"]
        assert choice["finish_reason"] == "stop", (fields, text)
        assert check(text) if check else re.fullmatch(r"[0-9]{3}-[a-z]{2,6}", text), (fields, text)


def _validate_calls(calls: list[Any], tools: list[dict[str, Any]]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_required_and_named_tool_choice_call_a_tool(
    greedy: dict[str, Any], client: openai.OpenAI, tool_choice
) -> None:
    completion = client.chat.completions.create(
        **greedy, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice=tool_choice,
        max_tokens=80,
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    _validate_calls(choice.message.tool_calls, [WEATHER, TIME])
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]


def test_auto_is_text_or_a_valid_call(greedy: dict[str, Any], client: openai.OpenAI) -> None:
    for messages in (ASK_WEATHER, [{"role": "user", "content": "Say hello."}]):
        completion = client.chat.completions.create(
            **greedy, messages=messages, tools=[WEATHER], max_tokens=60
        )
        choice = completion.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _validate_calls(choice.message.tool_calls, [WEATHER])
        else:
            assert choice.message.content and "<tool_call>" not in choice.message.content


def test_streamed_tool_calls_equal_the_whole_response(
    greedy: dict[str, Any], client: openai.OpenAI
) -> None:
    request = {**greedy, "messages": ASK_WEATHER, "tools": [WEATHER, TIME],
               "tool_choice": "required", "max_tokens": 80}  # fmt: skip
    whole = client.chat.completions.create(**request).choices[0]
    calls: dict[int, dict[str, str]] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    expected = [{"name": c.function.name, "arguments": c.function.arguments}
                for c in whole.message.tool_calls]  # fmt: skip
    assert [calls[i] for i in sorted(calls)] == expected
    assert (content or None, finish) == (whole.message.content, whole.finish_reason)


def test_second_turn_with_the_tool_result_is_answered(
    greedy: dict[str, Any], client: openai.OpenAI
) -> None:
    first = client.chat.completions.create(
        **greedy, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=80
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'},
    ]
    second = client.chat.completions.create(
        **greedy, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=40
    )
    answer = second.choices[0]
    assert answer.message.content and answer.message.tool_calls is None
    assert answer.finish_reason in ("stop", "length")


SCHEMA_FIELD = "response_format.json_schema.schema"
BAD_REQUESTS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "dependentSchemas": {}}}}}, SCHEMA_FIELD, "dependentSchemas"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs", "unclosed group"),
    ({"guided_regex": "[^\\x00-\\U0010FFFF]"}, "guided_regex", "allows no output"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_grammar": "start: nothing_here"}, "guided_grammar", "nothing_here"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "cannot be combined"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name", "twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]},
     "tools", "bogus"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "word"), BAD_REQUESTS)
def test_unusable_requests_are_400_naming_the_field(
    greedy_body: dict[str, Any], http: httpx.Client, fields: dict, param: str, word: str
) -> None:
    body = {**greedy_body, "messages": ASK_WEATHER, "max_tokens": 4, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and word in error["message"], error


def test_max_tokens_inside_a_value_says_length(
    greedy_body: dict[str, Any], http: httpx.Client
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}},
              "required": ["answer"]}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    body = {
        **greedy_body,
        "messages": ASK_WEATHER,
        "max_tokens": 3,
        "response_format": response_format,
    }
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


def test_logprobs_of_tokens_the_grammar_bans_are_finite(
    greedy_body: dict[str, Any], http: httpx.Client
) -> None:
    body = {**greedy_body, "messages": ASK_WEATHER, "guided_choice": ["yes", "no"],
            "logprobs": True, "top_logprobs": 20}  # fmt: skip
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    entry = response.json()["choices"][0]["logprobs"]["content"][0]
    assert [t["logprob"] for t in entry["top_logprobs"]][-1] == -9999.0  # banned: "impossible"
