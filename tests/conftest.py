"""Session-wide fixtures: each real model file is located once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvlm.loading.registry import resolve_model_path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return resolve_model_path("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_llm():
    from kvlm import LLM

    return LLM("smollm2")


@pytest.fixture(scope="session")
def gemma3_llm():
    from kvlm import LLM

    return LLM("gemma3-270m")
