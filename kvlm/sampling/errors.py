"""The error a bad sampling parameter raises, and the type checks every parameter module words
alike: a leaf, so `params.py`, `press.py` and `structured_params.py` share them without
importing each other round a cycle."""

from __future__ import annotations

from typing import Any


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type."""


def describe(value: Any) -> str:
    """A bad value as an error names it: its repr and its type."""
    return f"{value!r} ({type(value).__name__})"


def check_int(
    name: str,
    value: Any,
    *,
    optional: bool = False,
    error: type[SamplingParamsError] = SamplingParamsError,
) -> None:
    """`error` unless `value` is an int (or None when `optional`)."""
    # bool is a subclass of int; `max_tokens=True` is a bug, never a count.
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        wanted = "an int or None" if optional else "an int"
        raise error(f"{name} must be {wanted}, got {describe(value)}")
