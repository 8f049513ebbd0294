"""Fixtures for the command-line tests.

Loading a model takes seconds, so the commands run in-process get engines from a session-wide
cache keyed by their `EngineConfig`: each distinct configuration loads once. Before an engine is
handed out again its prefix cache is emptied, so every command starts cold, as a new process
would. (`test_console_entry_point_exit_code` still runs the real `kvlm` process.)
"""

from __future__ import annotations

from typing import Any

import pytest

from kvlm import LLM
from kvlm.engine.config import EngineConfig

_ENGINES: dict[EngineConfig, LLM] = {}


def cached_llm(**kwargs: Any) -> LLM:
    """`LLM(**kwargs)`, loaded once per configuration, with an empty prefix cache."""
    key = EngineConfig(**kwargs)
    if key not in _ENGINES:
        _ENGINES[key] = LLM(**kwargs)
    llm = _ENGINES[key]
    assert not llm.engine.has_unfinished(), "a previous test left a request running"
    if llm.engine.kv_cache is not None:
        llm.engine.kv_cache.reset_prefix_cache()
    return llm


@pytest.fixture(autouse=True)
def _reuse_loaded_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvlm.cli.common.LLM", cached_llm)
    monkeypatch.setattr("kvlm.bench.backends.LLM", cached_llm)
    monkeypatch.setattr("kvlm.bench.prefix.LLM", cached_llm)
    monkeypatch.setattr("kvlm.bench.memory.LLM", cached_llm)


@pytest.fixture
def smollm2_llm() -> LLM:
    return cached_llm(model="smollm2")
