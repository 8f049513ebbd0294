"""The constraint a request asks for, from whichever field it used, compiled before any compute.

Sources, at most one per request (each names itself in a refusal):
  - `response_format`: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}` (OpenAI's; `{"type": "text"}` is no constraint);
  - `structured_outputs`: vLLM's object, one of json / regex / choice / grammar / json_object;
  - `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`: vLLM's older fields;
  - `tools` with `tool_choice` auto, required or a named function (chat only: `tools.py`).

Compiling against the served vocabulary is the check: a schema llguidance cannot implement, an
invalid regex, a grammar that does not parse or allows no token is a 400 naming the field.
"""

from __future__ import annotations

from kvlm.sampling import SamplingParamsError, StructuredOutputsParams
from kvlm.sampling.structured_grammar import GrammarCompiler, StructuredOutputsError
from kvlm.server.errors import APIError
from kvlm.server.protocol import SamplingRequest

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def requested_constraints(
    request: SamplingRequest, tool_grammar: str | None = None
) -> list[tuple[str, StructuredOutputsParams]]:
    """Every constraint the body asks for, with the field it came from (400 for a malformed
    one); `tool_grammar` is the grammar `tools` / `tool_choice` enforce, if any."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        found.append(_response_format(request))
    if request.structured_outputs is not None:
        given = request.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        found.append(("structured_outputs", _params("structured_outputs", **given)))
    for name in _GUIDED:
        value = getattr(request, name)
        if value is not None:
            found.append((name, _params(name, **{name.removeprefix("guided_"): value})))
    if tool_grammar is not None:
        found.append(("tools", _params("tools", grammar=tool_grammar)))
    return found


def compiled_constraint(
    request: SamplingRequest, compiler: GrammarCompiler, tool_grammar: str | None = None
) -> StructuredOutputsParams | None:
    """The one constraint of the request, compiled (and cached for the engine); None when
    unconstrained. 400 for two at once, or one the grammar engine cannot use."""
    found = requested_constraints(request, tool_grammar)
    if not found:
        return None
    if len(found) > 1:
        names = [name for name, _ in found]
        raise APIError(
            f"{names[1]} cannot be combined with {names[0]}: a request takes one constraint "
            "(response_format, structured_outputs, guided_*, or tools with tool_choice "
            "auto / required / a function)",
            param=names[1],
        )
    param, spec = found[0]
    try:
        compiler.compile(spec)
    except StructuredOutputsError as e:
        raise APIError(f"{param}: {e}", param=param) from e
    return spec


def _response_format(request: SamplingRequest) -> tuple[str, StructuredOutputsParams]:
    response_format = request.response_format
    assert response_format is not None
    if response_format.type == "json_object":
        if response_format.json_schema is not None:
            raise APIError(
                'response_format.json_schema goes with {"type": "json_schema"}, not json_object',
                param="response_format.json_schema",
            )
        return "response_format", _params("response_format", json_object=True)
    json_schema = response_format.json_schema
    if json_schema is None:
        raise APIError(
            'response_format {"type": "json_schema"} needs json_schema: {"name": ..., '
            '"schema": {...}}',
            param="response_format.json_schema",
        )
    if json_schema.schema_ is None:  # OpenAI's default: any JSON object
        return "response_format", _params("response_format", json_object=True)
    param = "response_format.json_schema.schema"
    return param, _params(param, json=json_schema.schema_)


def _params(param: str, **fields: object) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)  # type: ignore[arg-type]
    except SamplingParamsError as e:
        message = str(e).replace("structured_outputs", param, 1)
        raise APIError(message, param=param) from e
