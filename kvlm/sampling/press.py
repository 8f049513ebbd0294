"""`KVPress`: how a request's KV cache is compressed once its prompt is prefilled.

A press scores every cached token per layer and KV head and keeps the same number of tokens
in each, `max(1, int(n * (1 - ratio)))` of the n cached (kvpress's count); the engine then
compacts the kept K/V into fewer blocks and returns the rest to the pool (engine/press.py).
Methods, as kvpress defines them:
- "knorm": keep the keys of smallest L2 norm (score = -||k||).
- "streaming_llm": keep the first `num_sinks` tokens and the most recent ones.
- "snapkv": the softmax attention of the observation window's queries (the prompt's last
  `window` tokens, which a question ending the prompt makes question-aware) over the keys
  before the window, averaged over the window and over the query heads of each KV head,
  smoothed by an average pool of width 5; the window's own tokens are always kept.
- "expected_attention": future queries modelled as a Gaussian, from the mean and covariance
  of the window's queries before rope (the last `window` tokens, not the first `num_sinks`),
  rotated by the mean rope of the `num_future_positions` positions after the press; a key k
  scores its expected softmax weight, exp(mu.k + k^T Sigma k / 2) (scale folded into the
  queries) normalised over the keys, averaged over each KV head's query heads, times the norm
  of its value; the first `num_sinks` tokens are always kept. kvpress's defaults:
  n_future_positions 512, n_sink 4, use_covariance and use_vnorm on, epsilon 0. kvpress's
  prefill press takes the statistics of every query after the sinks: a window at least as
  long as the prompt does the same here.
A value object only: validated on construction, hashable, shared between requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvlm.sampling.errors import SamplingParamsError

# Each method and the options it reads (it ignores the others): what a label of it shows.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "knorm": (),
    "streaming_llm": ("num_sinks",),
    "snapkv": ("window",),
    "expected_attention": ("window", "num_sinks", "num_future_positions"),
}
PRESS_METHODS = tuple(METHOD_OPTIONS)
# expected_attention averages the rope of this many positions at most (kvpress's default: 512)
MAX_FUTURE_POSITIONS = 65_536


class KVPressError(SamplingParamsError):
    """A press value is unknown or out of range."""


@dataclass(frozen=True)
class KVPress:
    method: str
    # Fraction of the prompt's cached tokens dropped, in [0, 1); 0 keeps every token.
    ratio: float = 0.5
    # Observation window: the prompt's last `window` tokens (snapkv and expected_attention
    # score with their queries).
    window: int = 64
    # streaming_llm, expected_attention: leading tokens always kept.
    num_sinks: int = 4
    # expected_attention: the positions after the press whose mean rope rotates the queries.
    num_future_positions: int = 512

    def __post_init__(self) -> None:
        if self.method not in PRESS_METHODS:
            raise KVPressError(
                f"unknown kv press {self.method!r}; choose one of {', '.join(PRESS_METHODS)}"
            )
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise KVPressError(f"kv press ratio must be a number, got {_describe(ratio)}")
        if not (math.isfinite(ratio) and 0 <= ratio < 1):
            raise KVPressError(
                f"kv press ratio must be in [0, 1) (the fraction of tokens dropped), got {ratio!r}"
            )
        for name in ("window", "num_sinks", "num_future_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise KVPressError(f"kv press {name} must be an int, got {_describe(value)}")
        if self.window < 1:
            raise KVPressError(f"kv press window must be >= 1 token, got {self.window}")
        if self.num_sinks < 0:
            raise KVPressError(f"kv press num_sinks must be >= 0, got {self.num_sinks}")
        if not 1 <= self.num_future_positions <= MAX_FUTURE_POSITIONS:
            raise KVPressError(
                f"kv press num_future_positions must be in [1, {MAX_FUTURE_POSITIONS}], got "
                f"{self.num_future_positions}"
            )
        object.__setattr__(self, "ratio", float(ratio))

    def options(self) -> dict[str, int]:
        """The options this press's method reads, by name (`METHOD_OPTIONS`)."""
        return {name: getattr(self, name) for name in METHOD_OPTIONS[self.method]}

    def num_kept(self, num_tokens: int) -> int:
        """Tokens kept per layer and KV head of `num_tokens` cached ones (at least one)."""
        return max(1, int(num_tokens * (1 - self.ratio)))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
