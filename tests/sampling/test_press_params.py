"""KVPress: every bad value is one KVPressError (a SamplingParamsError, so a ValueError) that
names the field; good values normalise and count kept tokens as kvpress does."""

from __future__ import annotations

import pytest

from kvlm import KVPress, SamplingParams
from kvlm.sampling import KVPressError, SamplingParamsError


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"method": "h2o"}, "unknown kv press 'h2o'"),
        ({"method": "knorm", "ratio": 1.0}, "ratio must be in [0, 1)"),
        ({"method": "knorm", "ratio": -0.25}, "ratio must be in [0, 1)"),
        ({"method": "knorm", "ratio": float("nan")}, "ratio must be in [0, 1)"),
        ({"method": "knorm", "ratio": "0.5"}, "ratio must be a number"),
        ({"method": "knorm", "ratio": True}, "ratio must be a number"),
        ({"method": "snapkv", "window": 0}, "window must be >= 1"),
        ({"method": "snapkv", "window": 2.5}, "window must be an int"),
        ({"method": "streaming_llm", "num_sinks": -1}, "num_sinks must be >= 0"),
        ({"method": "expected_attention", "num_future_positions": 0}, "in [1, 65536], got 0"),
        ({"method": "expected_attention", "num_future_positions": 1.5}, "must be an int"),
    ],
)
def test_bad_values_raise_one_error_naming_the_field(kwargs: dict, words: str) -> None:
    with pytest.raises(KVPressError) as info:
        KVPress(**kwargs)
    assert words in str(info.value)
    assert isinstance(info.value, SamplingParamsError) and isinstance(info.value, ValueError)


def test_sampling_params_takes_only_a_press() -> None:
    press = KVPress("snapkv", ratio=0.5, window=32)
    assert SamplingParams(kv_press=press).kv_press is press
    with pytest.raises(SamplingParamsError, match="kv_press must be a KVPress"):
        SamplingParams(kv_press="snapkv")  # type: ignore[arg-type]


def test_ratio_is_a_float_and_kept_count_is_kvpress_s() -> None:
    press = KVPress("knorm", ratio=0)
    assert press.ratio == 0.0 and isinstance(press.ratio, float)
    assert press.num_kept(100) == 100
    assert KVPress("knorm", ratio=0.75).num_kept(100) == 25
    assert KVPress("knorm", ratio=0.75).num_kept(10) == 2  # int(2.5)
    assert KVPress("knorm", ratio=0.99).num_kept(10) == 1  # never none
    assert hash(KVPress("knorm")) == hash(KVPress("knorm"))


def test_a_press_names_the_options_its_method_reads() -> None:
    assert KVPress("knorm", window=8).options() == {}
    assert KVPress("snapkv", window=8).options() == {"window": 8}
    assert KVPress("streaming_llm", num_sinks=2).options() == {"num_sinks": 2}
    defaults = KVPress("expected_attention").options()  # kvpress's n_sink, n_future_positions
    assert defaults == {"window": 64, "num_sinks": 4, "num_future_positions": 512}
