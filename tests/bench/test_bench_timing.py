"""Per-token timings: what a run of the longest length says about every shorter one."""

from __future__ import annotations

import pytest

from kvlm.bench.backends import RunTiming
from kvlm.bench.common import BenchConfigError
from kvlm.bench.decode import note_no_cache
from kvlm.bench.decode_data import DecodeBenchConfig, DecodeBenchResult, Trace
from kvlm.bench.machine import machine_info
from kvlm.bench.sampled import extend, sample_steps


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
    sampled = Trace("kvlm-no-cache", 16, (1.0,), sampled=((4, 2.0), (9, 3.0)))
    assert sampled.sampled_ms_at(10) == 3000.0 and sampled.sampled_ms_at(9) == 2000.0
    assert sampled.sampled_ms_at(4) is None  # token 4 is the 5th: no step sampled before it


def test_no_cache_stops_at_its_cap() -> None:
    config = DecodeBenchConfig(new_tokens=(32, 128, 512, 1024), no_cache_max_tokens=512)
    assert config.lengths("kvlm-no-cache") == (32, 128, 512)
    assert config.lengths("hf") == (32, 128, 512, 1024)


def test_a_run_extended_by_sampled_steps() -> None:
    run = RunTiming.from_token_times([1.0, 2.0], 1)  # every step timed up to 2 tokens
    extended = extend(run, [(2, 1.0), (4, 3.0)], batch_size=1)  # steps 2 and 4 timed alone
    assert extended.token_times_s == pytest.approx((1.0, 2.0, 3.0, 5.0, 8.0))  # step 3: 2.0
    assert extended.truncated(2, 1) == run


def test_sampled_steps_time_one_forward_over_the_sequence_so_far() -> None:
    seen = []

    class Backend:
        name = "fake"
        notes: list[str] = []

        def run(self, prompts, num_new_tokens, on_token=None):  # noqa: ANN001, ANN201
            seen.append((len(prompts[0]), num_new_tokens))
            return RunTiming.from_token_times([len(prompts[0]) / 100], 1)

    samples = sample_steps(Backend(), lambda n: [[0] * n], 16, first=4, last=13, stride=4)
    assert seen == [(20, 1), (24, 1), (28, 1), (29, 1)]  # 16 + i for i = 4, 8, 12 and 13
    assert samples == [(4, 0.2), (8, 0.24), (12, 0.28), (13, 0.29)]


def test_no_cache_past_its_cap_is_noted_or_skipped() -> None:
    sampled = DecodeBenchConfig(new_tokens=(32, 1024), no_cache_max_tokens=512)
    result = DecodeBenchResult(sampled, machine_info(), [[1]])
    note_no_cache(sampled, result)
    assert result.skipped == [] and "one step in 32" in result.notes[0]
    assert sampled.sampled_lengths() == (1024,)
    skipping = DecodeBenchConfig(new_tokens=(32, 1024), no_cache_max_tokens=512, no_cache_stride=0)
    result = DecodeBenchResult(skipping, machine_info(), [[1]])
    note_no_cache(skipping, result)
    assert skipping.sampled_lengths() == ()
    (skipped,) = result.skipped
    assert skipped.engine == "kvlm-no-cache" and "not run at 1024 new tokens" in skipped.reason
    with pytest.raises(BenchConfigError, match="no_cache_stride must be >= 0"):
        DecodeBenchConfig(no_cache_stride=-1)
