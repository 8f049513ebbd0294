"""The recorder reads real K/V from the right cache rows and leaves the engine as it was."""

from __future__ import annotations

import uuid

import pytest

from kvlm.engine.scheduler import Scheduler
from kvlm.sampling import SamplingParams
from kvlm.viz.recorder import record_generation


def test_layer_zero_values_depend_on_the_token_only(smollm2_llm) -> None:
    """Layer 0's V is a projection of the token's embedding (no rope, no context), so equal
    tokens at different positions must read back equal rows: wrong rows would differ."""
    engine = smollm2_llm.engine
    prompt = f"{uuid.uuid4().hex}: red green blue red green blue red green blue"
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    recording = record_generation(engine, prompt, params, {}, num_channels=16)
    assert "update_after_step" not in vars(engine.scheduler)  # the hook is gone
    assert engine.scheduler.update_after_step.__func__ is Scheduler.update_after_step
    values = recording.values[0]
    assert len(values) == len(recording.token_ids) - 1  # the last sampled token is not computed
    rows_by_token: dict[int, list[list[float]]] = {}
    for token_id, row in zip(recording.token_ids[:-1], values, strict=True):
        if row is not None:
            rows_by_token.setdefault(token_id, []).append(row)
    repeated = [rows for rows in rows_by_token.values() if len(rows) >= 3]
    assert len(repeated) >= 3
    for rows in repeated:
        for row in rows[1:]:
            assert row == pytest.approx(rows[0], abs=1e-4)
    assert recording.keys[0][5] != recording.keys[0][8]  # keys carry their position (rope)
    steps = recording.steps
    assert [s.kind for s in steps] == ["prefill"] + ["decode"] * 5
    assert steps[0].end == recording.num_prompt_tokens
    assert all(s.sampled is not None for s in steps)


def test_an_idle_engine_with_a_cache_is_needed(smollm2_llm) -> None:
    engine = smollm2_llm.engine
    engine.add_request("busy", None, SamplingParams(max_tokens=1))
    try:
        with pytest.raises(ValueError, match="engine is busy"):
            record_generation(engine, "x", SamplingParams(max_tokens=1), {})
    finally:
        while engine.has_unfinished():
            engine.step()
