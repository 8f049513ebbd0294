"""The error a bad sampling parameter raises: a leaf, so `params.py` and `structured_params.py`
both raise it without importing each other round a cycle."""

from __future__ import annotations


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type."""
