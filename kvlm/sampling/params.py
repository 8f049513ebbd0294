"""Per-request sampling parameters, with vLLM's field names and meanings.

A `SamplingParams` is immutable once built and validated: every field is checked in
`__post_init__`, and the list-like fields are normalised to tuples (so the object is hashable and
can be shared between requests). Use `dataclasses.replace` to derive a variant; it re-validates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvlm.sampling.errors import SamplingParamsError, check_int, describe
from kvlm.sampling.press import KVPress
from kvlm.sampling.structured_params import StructuredOutputsParams

# Below this temperature a request is sampled greedily (dividing logits by a smaller number only
# overflows; vLLM uses the same cut-off).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty is [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value is [-100, 100]
_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts 64-bit seeds


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(f"{name} must be a number, got {describe(value)}")
    if not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be True or False, got {describe(value)}")


def _normalize_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise SamplingParamsError(
            f"stop must be a string, a list of strings or None, got {describe(value)}"
        )
    for item in items:
        if not isinstance(item, str) or not item:
            raise SamplingParamsError(
                f"stop must contain only non-empty strings, got {describe(item)} in {value!r}"
            )
    return tuple(items)


def _normalize_stop_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise SamplingParamsError(
            f"stop_token_ids must be a list of ints or None, got {describe(value)}"
        )
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise SamplingParamsError(
                f"stop_token_ids must contain only ints >= 0, got {describe(item)} in {value!r}"
            )
    return tuple(value)


def _normalize_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items: Sequence[Any] = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise SamplingParamsError(
            f"logit_bias must map token ids to numbers (or be None), got {describe(value)}"
        )
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise SamplingParamsError(
                f"logit_bias must map token ids to numbers, got the entry {describe(item)}"
            )
        token_id, bias = item
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise SamplingParamsError(
                f"logit_bias keys must be token ids (ints >= 0), got {describe(token_id)}"
            )
        bias = _check_float(f"logit_bias[{token_id}]", bias)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise SamplingParamsError(
                f"logit_bias[{token_id}] must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {bias!r}"
            )
        pairs[token_id] = bias
    return tuple(sorted(pairs.items()))


def _check_structured(value: Any) -> None:
    if value is not None and not isinstance(value, StructuredOutputsParams):
        raise SamplingParamsError(
            f"structured_outputs must be a StructuredOutputsParams or None, got {describe(value)}"
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each generated token of one request, and when to stop.

    Invariants after construction: `stop` is a tuple of non-empty strings, `stop_token_ids` a
    tuple of ints >= 0 (both empty when unset), `logit_bias` a tuple of (token_id, bias) pairs
    sorted by id (empty when unset), and `top_k` is 0 when top-k is off (-1 on input is
    accepted and normalised to 0).
    """

    # Completions returned per prompt: its sequences share the prompt's K/V blocks.
    n: int = 1
    # Sequences generated per prompt (>= n), of which the n with the highest cumulative
    # log-probability are returned, once all have finished; None = n.
    best_of: int | None = None
    # 0 (or anything below GREEDY_TEMPERATURE) means greedy: argmax of the penalised logits.
    temperature: float = 1.0
    # Keep the smallest set of most likely tokens whose probability mass reaches top_p.
    top_p: float = 1.0
    # Keep the top_k most likely tokens; 0 or -1 = off.
    top_k: int = 0
    # Drop tokens whose probability is below min_p times the most likely token's.
    min_p: float = 0.0
    # For every token id already in the prompt or output: positive logits are divided by it,
    # negative logits multiplied (the HF / vLLM rule). 1.0 = off.
    repetition_penalty: float = 1.0
    # Seeds the request's own generator, so its tokens do not depend on the batch it ran in.
    seed: int | None = None
    # Generation stops when the text contains one of these; normalised to tuple[str, ...].
    stop: str | Sequence[str] | None = None
    # Generation stops after emitting one of these ids; normalised to tuple[int, ...].
    stop_token_ids: Sequence[int] | None = None
    # Generated-token budget; None = until the model's context is full.
    max_tokens: int | None = 16
    # Keep generating past the model's end-of-sequence token.
    ignore_eos: bool = False
    # Number of top log-probabilities to return per generated token (the sampled token's is
    # always added); None = none at all.
    logprobs: int | None = None
    # Log-probabilities of the prompt's own tokens (each one given those before it), with this
    # many top alternatives per token; None = none. Such a request takes no prefix-cache hit
    # over the tokens it scores: every prompt row is computed and projected (vLLM's field).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # OpenAI's penalties, counted over generated tokens only (never the prompt), in [-2, 2]:
    # logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Added to these token ids' logits before any other transform, each in [-100, 100]
    # (+100 all but forces a token, -100 all but bans it); a {token_id: bias} mapping,
    # normalised to a tuple of (token_id, bias) pairs sorted by id.
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] | None = None
    # EOS (unless ignore_eos) and stop_token_ids cannot be sampled before this many tokens.
    min_tokens: int = 0
    # Constrain the output to a JSON schema, regex, choice or grammar (llguidance masks the
    # logits); None = unconstrained, at no cost.
    structured_outputs: StructuredOutputsParams | None = None
    # Compress the request's KV cache once its prompt is prefilled (sampling/press.py); None =
    # keep every token. Only full-attention layers are pressed (Gemma 3's local layers keep
    # their window); refused by an engine without a cache or with a window in every layer.
    kv_press: KVPress | None = None

    def __post_init__(self) -> None:
        check_int("n", self.n)
        if self.n < 1:
            raise SamplingParamsError(f"n must be >= 1, got {self.n}")
        check_int("best_of", self.best_of, optional=True)
        if self.best_of is not None and self.best_of < self.n:
            raise SamplingParamsError(
                f"best_of must be >= n ({self.n}), got {self.best_of}: it is how many "
                "sequences are generated to return the n best"
            )

        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise SamplingParamsError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if temperature < GREEDY_TEMPERATURE and self.num_sequences > 1:
            field = "n" if self.best_of is None else "best_of"
            raise SamplingParamsError(
                f"{field} must be 1 with greedy sampling (temperature 0), got "
                f"{self.num_sequences}: every sequence would be the same; raise temperature"
            )
        top_p = _check_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise SamplingParamsError(
                f"top_k must be >= 1, or 0 / -1 to disable it, got {self.top_k}"
            )
        min_p = _check_float("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p!r}")
        penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise SamplingParamsError(
                f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}"
            )

        presence = _check_float("presence_penalty", self.presence_penalty)
        frequency = _check_float("frequency_penalty", self.frequency_penalty)
        for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise SamplingParamsError(
                    f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 = off), "
                    f"got {value!r}"
                )
        logit_bias = _normalize_logit_bias(self.logit_bias)

        check_int("seed", self.seed, optional=True)
        if self.seed is not None and not 0 <= self.seed <= _MAX_SEED:
            raise SamplingParamsError(f"seed must be in [0, 2**64 - 1], got {self.seed}")
        check_int("max_tokens", self.max_tokens, optional=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamsError(
                f"max_tokens must be >= 1 (or None for 'until the context is full'), "
                f"got {self.max_tokens}"
            )
        check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise SamplingParamsError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        check_int("logprobs", self.logprobs, optional=True)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingParamsError(
                f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}"
            )
        check_int("prompt_logprobs", self.prompt_logprobs, optional=True)
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise SamplingParamsError(
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}] or None, got "
                f"{self.prompt_logprobs}"
            )
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        _check_structured(self.structured_outputs)
        if self.kv_press is not None and not isinstance(self.kv_press, KVPress):
            raise SamplingParamsError(
                f"kv_press must be a KVPress or None, got {describe(self.kv_press)}"
            )

        # Normalise (frozen dataclass: assign through object.__setattr__).
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "top_k", max(self.top_k, 0))
        object.__setattr__(self, "min_p", min_p)
        object.__setattr__(self, "repetition_penalty", penalty)
        object.__setattr__(self, "presence_penalty", presence)
        object.__setattr__(self, "frequency_penalty", frequency)
        object.__setattr__(self, "logit_bias", logit_bias)
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalize_stop_token_ids(self.stop_token_ids))

    @property
    def num_sequences(self) -> int:
        """Sequences generated for the prompt: best_of, or n without it."""
        return self.n if self.best_of is None else self.best_of

    @property
    def is_greedy(self) -> bool:
        """True when the token is the argmax; top-k / top-p / min-p / seed are then unused."""
        return self.temperature < GREEDY_TEMPERATURE
