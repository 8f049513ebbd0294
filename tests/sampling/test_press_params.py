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
        ({"method": "tova"}, "tova needs a budget"),
        ({"method": "tova", "budget": 64, "ratio": 0.5}, "takes no ratio (got 0.5)"),
        ({"method": "tova", "budget": 0}, "budget must be >= 1 token, got 0"),
        ({"method": "tova", "budget": 64.0}, "budget must be an int"),
        ({"method": "tova", "budget": True}, "budget must be an int"),
        ({"method": "knorm", "budget": 64}, "knorm takes no budget (got 64)"),
        ({"method": "snapkv", "ratio": 0.5, "budget": 64}, "only tova keeps a budget"),
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
    assert KVPress("knorm") == KVPress("knorm", ratio=0.5)  # no ratio: 0.5


def test_tova_keeps_at_most_its_budget_and_reads_the_newest_query() -> None:
    press = KVPress("tova", budget=64)
    assert press.ratio is None and press.keeps_budget and not KVPress("knorm").keeps_budget
    assert (press.num_kept(100), press.num_kept(64), press.num_kept(10)) == (64, 64, 10)
    assert press.query_window(100) == (99, 100)  # the last cached token's query
    assert KVPress("snapkv", window=8).query_window(100) == (92, 100)
    assert KVPress("expected_attention", window=8, num_sinks=4).query_window(10) == (4, 10)
    assert KVPress("knorm").query_window(100) is None


def test_a_press_names_the_options_its_method_reads() -> None:
    assert KVPress("knorm", window=8).options() == {}
    assert KVPress("snapkv", window=8).options() == {"window": 8}
    assert KVPress("streaming_llm", num_sinks=2).options() == {"num_sinks": 2}
    defaults = KVPress("expected_attention").options()  # kvpress's n_sink, n_future_positions
    assert defaults == {"window": 64, "num_sinks": 4, "num_future_positions": 512}
    assert KVPress("tova", budget=256, window=8).options() == {"budget": 256}
