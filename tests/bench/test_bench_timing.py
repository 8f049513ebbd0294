"""Per-token timings: what a run of the longest length says about every shorter one."""

from __future__ import annotations

import pytest

from kvlm.bench.backends import RunTiming
from kvlm.bench.decode import DecodeBenchConfig, Trace


def test_run_timing_from_token_times() -> None:
    run = RunTiming.from_token_times([0.5, 1.0, 1.5, 3.0], batch_size=2)
    assert run.wall_s == 3.0 and run.prefill_s == 0.5 and run.num_generated_tokens == 8
    assert run.decode_tok_s == pytest.approx(3 * 2 / 2.5)
    short = run.truncated(2, batch_size=2)
    assert short.token_times_s == (0.5, 1.0) and short.wall_s == 1.0
    assert short.decode_tok_s == pytest.approx(2 / 0.5)
    assert run.truncated(1, 2).decode_tok_s is None  # one token: prefill only
    with pytest.raises(ValueError, match="cannot stand for 5"):
        run.truncated(5, 2)


def test_trace_takes_the_median_step_of_the_runs() -> None:
    runs = [
        RunTiming.from_token_times([1.0, 2.0, 4.0], 1),  # steps 1, 1, 2
        RunTiming.from_token_times([2.0, 3.0, 6.0], 1),  # steps 2, 1, 3
        RunTiming.from_token_times([3.0, 5.0, 6.0], 1),  # steps 3, 2, 1
    ]
    trace = Trace.from_runs("kvlm", 16, runs)
    assert trace.step_s == (2.0, 1.0, 2.0)
    assert trace.step_ms_near(3, width=2) == pytest.approx(1500.0)  # steps 1 and 2


def test_no_cache_stops_at_its_cap() -> None:
    config = DecodeBenchConfig(new_tokens=(32, 128, 512, 1024), no_cache_max_tokens=512)
    assert config.lengths("kvlm-no-cache") == (32, 128, 512)
    assert config.lengths("hf") == (32, 128, 512, 1024)
