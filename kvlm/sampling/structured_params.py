"""What a constrained request asks its output to be, in vLLM's shape (`StructuredOutputsParams`).

Exactly one constraint per request: a JSON schema, a regular expression, a choice of strings, a
grammar (Lark or GBNF, as llguidance reads them) or "any JSON object". The object is frozen and
hashable (a schema given as a dict is kept as JSON text), so equal constraints share
one compiled grammar (`structured.GrammarCompiler`). Whether the constraint compiles is only
known with the model's vocabulary: that check is the compiler's, before any compute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from kvlm.sampling.errors import SamplingParamsError

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Invariants after construction: exactly one field is set; `json` is a JSON object as
    JSON text (its key order kept: properties are generated in that order), `choice` a
    non-empty tuple of strings, `regex` and `grammar` non-empty strings, `json_object` True
    or None."""

    json: str | Mapping[str, Any] | None = None  # a JSON schema (dict or JSON text)
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF (llama.cpp's)
    json_object: bool | None = None  # any JSON object

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            shown = ", ".join(given) if given else "none"
            raise SamplingParamsError(
                f"structured_outputs needs exactly one of {', '.join(_KINDS)}; got {shown}"
            )
        object.__setattr__(self, "json", _schema_text(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", _choices(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SamplingParamsError(
                    f"structured_outputs.{name} must be a non-empty string, got {value!r}"
                )
        if self.json_object not in (None, True):
            raise SamplingParamsError(
                f"structured_outputs.json_object must be True (or unset), got {self.json_object!r}"
            )

    @property
    def kind(self) -> str:
        """The one field that is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(name for name in _KINDS if getattr(self, name) is not None)


def _schema_text(schema: Any) -> str | None:
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SamplingParamsError(f"structured_outputs.json is not valid JSON: {e}") from e
    if not isinstance(schema, Mapping):
        raise SamplingParamsError(
            f"structured_outputs.json must be a JSON schema (an object), got "
            f"{type(schema).__name__}"
        )
    try:
        return json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise SamplingParamsError(f"structured_outputs.json is not JSON data: {e}") from e


def _choices(choice: Any) -> tuple[str, ...]:
    if isinstance(choice, str) or not isinstance(choice, Sequence) or not choice:
        raise SamplingParamsError(
            f"structured_outputs.choice must be a non-empty list of strings, got {choice!r}"
        )
    bad = [c for c in choice if not isinstance(c, str) or not c]
    if bad:
        raise SamplingParamsError(
            f"structured_outputs.choice must hold non-empty strings only, got {bad[0]!r}"
        )
    return tuple(choice)
