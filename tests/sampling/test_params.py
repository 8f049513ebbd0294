"""SamplingParams: defaults, normalisation, and one test per validation error."""

from __future__ import annotations

import dataclasses
import math

import pytest

from kvlm.sampling import SamplingParams, SamplingParamsError


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert params.n == 1
    assert params.temperature == 1.0
    assert params.top_p == 1.0
    assert params.top_k == 0
    assert params.min_p == 0.0
    assert params.repetition_penalty == 1.0
    assert params.seed is None
    assert params.stop == ()
    assert params.stop_token_ids == ()
    assert params.max_tokens == 16
    assert params.ignore_eos is False
    assert params.logprobs is None
    assert params.skip_special_tokens is True
    assert params.include_stop_str_in_output is False
    assert params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
    assert params.logit_bias == () and params.min_tokens == 0
    assert not params.is_greedy


def test_normalisation() -> None:
    params = SamplingParams(stop="###", stop_token_ids=[2, 7], top_k=-1, temperature=1)
    assert params.stop == ("###",)
    assert params.stop_token_ids == (2, 7)
    assert params.top_k == 0
    assert isinstance(params.temperature, float)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    hash(params)  # tuples all the way down: usable as a dict key


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


def test_frozen_and_replace_revalidates() -> None:
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5  # type: ignore[misc]
    assert dataclasses.replace(params, stop="x").stop == ("x",)
    with pytest.raises(SamplingParamsError, match="top_p"):
        dataclasses.replace(params, top_p=2.0)


def test_n_and_best_of_give_the_number_of_sequences() -> None:
    assert SamplingParams().num_sequences == 1
    assert SamplingParams(n=3).num_sequences == 3
    assert SamplingParams(n=2, best_of=5).num_sequences == 5
    assert SamplingParams(best_of=1, temperature=0.0).num_sequences == 1


def test_accepted_edges() -> None:
    SamplingParams(top_p=1.0, min_p=1.0, top_k=1, logprobs=0, max_tokens=None, seed=0)
    SamplingParams(logprobs=20, seed=2**64 - 1, max_tokens=1, repetition_penalty=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be >= 1, got 0"),
        (
            {"n": 3, "best_of": 2},
            "best_of must be >= n (3), got 2: it is how many sequences are generated to "
            "return the n best",
        ),
        ({"best_of": 1.5}, "best_of must be an int or None, got 1.5 (float)"),
        (
            {"n": 2, "temperature": 0.0},
            "n must be 1 with greedy sampling (temperature 0), got 2: every sequence would "
            "be the same; raise temperature",
        ),
        (
            {"best_of": 3, "temperature": 0.0},
            "best_of must be 1 with greedy sampling (temperature 0), got 3: every sequence "
            "would be the same; raise temperature",
        ),
        ({"n": 1.0}, "n must be an int, got 1.0 (float)"),
        ({"temperature": -1.0}, "temperature must be >= 0 (0 = greedy), got -1.0"),
        ({"temperature": math.nan}, "temperature must be a finite number, got nan"),
        ({"temperature": math.inf}, "temperature must be a finite number, got inf"),
        ({"temperature": "0.7"}, "temperature must be a number, got '0.7' (str)"),
        ({"temperature": True}, "temperature must be a number, got True (bool)"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": math.nan}, "top_p must be a finite number, got nan"),
        ({"top_k": -2}, "top_k must be >= 1, or 0 / -1 to disable it, got -2"),
        ({"top_k": 5.0}, "top_k must be an int, got 5.0 (float)"),
        ({"top_k": True}, "top_k must be an int, got True (bool)"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 (1.0 = off), got 0.0"),
        ({"repetition_penalty": -1}, "repetition_penalty must be > 0 (1.0 = off), got -1"),
        ({"seed": -1}, "seed must be in [0, 2**64 - 1], got -1"),
        ({"seed": 2**64}, f"seed must be in [0, 2**64 - 1], got {2**64}"),
        ({"seed": "42"}, "seed must be an int or None, got '42' (str)"),
        ({"stop": 3}, "stop must be a string, a list of strings or None, got 3 (int)"),
        ({"stop": ["a", ""]}, "stop must contain only non-empty strings, got '' (str) in"),
        ({"stop": ["a", 1]}, "stop must contain only non-empty strings, got 1 (int) in"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of ints or None, got 5 (int)"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids must contain only ints >= 0, got -2"),
        ({"stop_token_ids": [True]}, "stop_token_ids must contain only ints >= 0, got True"),
        ({"max_tokens": 0}, "max_tokens must be >= 1 (or None for 'until the context is full')"),
        ({"max_tokens": "16"}, "max_tokens must be an int or None, got '16' (str)"),
        ({"max_tokens": True}, "max_tokens must be an int or None, got True (bool)"),
        ({"max_tokens": 8.0}, "max_tokens must be an int or None, got 8.0 (float)"),
        ({"logprobs": 21}, "logprobs must be in [0, 20] or None, got 21"),
        ({"logprobs": -1}, "logprobs must be in [0, 20] or None, got -1"),
        ({"logprobs": False}, "logprobs must be an int or None, got False (bool)"),
        ({"ignore_eos": 1}, "ignore_eos must be True or False, got 1 (int)"),
        ({"skip_special_tokens": None}, "skip_special_tokens must be True or False, got None"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2] (0 = off), got 2.5"),
        ({"frequency_penalty": -2.1}, "frequency_penalty must be in [-2, 2] (0 = off), got -2.1"),
        ({"frequency_penalty": "1"}, "frequency_penalty must be a number, got '1' (str)"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be token ids (ints >= 0), got '5'"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids (ints >= 0), got -1"),
        ({"logit_bias": {5: 100.5}}, "logit_bias[5] must be in [-100, 100], got 100.5"),
        ({"logit_bias": {5: math.nan}}, "logit_bias[5] must be a finite number, got nan"),
        ({"logit_bias": 5}, "logit_bias must map token ids to numbers (or be None), got 5"),
        ({"logit_bias": [5]}, "logit_bias must map token ids to numbers, got the entry 5"),
        ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
        ({"min_tokens": 1.0}, "min_tokens must be an int, got 1.0 (float)"),
        ({"min_tokens": 17}, "min_tokens (17) must not exceed max_tokens (16)"),
        (
            {"include_stop_str_in_output": "yes"},
            "include_stop_str_in_output must be True or False, got 'yes' (str)",
        ),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)


def test_logit_bias_is_normalised_to_sorted_pairs() -> None:
    params = SamplingParams(logit_bias={7: -100, 2: 0.5})
    assert params.logit_bias == ((2, 0.5), (7, -100.0))
    assert SamplingParams(logit_bias=[(7, -100), (2, 0.5)]) == params
    hash(params)  # still shareable between requests
    SamplingParams(logit_bias={0: 100, 1: -100}, min_tokens=16, presence_penalty=-2.0)


def test_max_tokens_message_names_value() -> None:
    with pytest.raises(SamplingParamsError, match=r"got 0$"):
        SamplingParams(max_tokens=0)
