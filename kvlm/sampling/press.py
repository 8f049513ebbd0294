"""`KVPress`: how a request's KV cache is compressed once its prompt is prefilled.

A press scores every cached token per layer and KV head and keeps the same number of tokens
in each, `max(1, int(n * (1 - ratio)))` of the n cached (kvpress's count), or for "tova" at
most `budget`; the engine then compacts the kept K/V into fewer blocks and returns the rest
to the pool (engine/press.py), in the full-attention layers only (a model's windowed layers,
Gemma 3's local ones, keep their window, as kvpress leaves them). Methods, as kvpress
defines them:
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
- "tova": the softmax attention of the newest token's query (at its own position) over every
  cached key, averaged over all the layer's query heads, so each KV head keeps the same
  tokens; the newest token is always kept. It keeps `budget` tokens while the request
  generates: the prompt is pressed to `budget`, and each time the cache grows to `budget`
  plus a block it is pressed back to `budget` (one block freed per press).
A value object only: validated on construction, hashable, shared between requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvlm.sampling.errors import SamplingParamsError, check_int, describe


@dataclass(frozen=True)
class PressMethod:
    """What a method reads besides the tokens' K/V."""

    # Its options, ratio aside (a label shows these); "budget": it keeps a fixed number of
    # tokens while generating and takes no ratio.
    options: tuple[str, ...]
    # Whose queries it scores with: "window" (the prompt's last `window` tokens, after the
    # first `num_sinks` if it keeps sinks), "newest" (the last cached token) or None.
    queries: str | None = None
    # The queries rotated by the mean rope of the positions after the press, not their own.
    future_rope: bool = False


METHOD_OPTIONS: dict[str, PressMethod] = {
    "knorm": PressMethod(()),
    "streaming_llm": PressMethod(("num_sinks",)),
    "snapkv": PressMethod(("window",), queries="window"),
    "expected_attention": PressMethod(
        ("window", "num_sinks", "num_future_positions"), queries="window", future_rope=True
    ),
    "tova": PressMethod(("budget",), queries="newest"),
}
PRESS_METHODS = tuple(METHOD_OPTIONS)
# expected_attention averages the rope of this many positions at most (kvpress's default: 512)
MAX_FUTURE_POSITIONS = 65_536


class KVPressError(SamplingParamsError):
    """A press value is unknown or out of range."""


@dataclass(frozen=True)
class KVPress:
    method: str
    # Fraction of the prompt's cached tokens dropped, in [0, 1); 0 keeps every token. None: 0.5
    # (kvpress's examples); tova takes none (it keeps `budget` tokens).
    ratio: float | None = None
    # Observation window: the prompt's last `window` tokens (snapkv and expected_attention
    # score with their queries).
    window: int = 64
    # streaming_llm, expected_attention: leading tokens always kept.
    num_sinks: int = 4
    # expected_attention: the positions after the press whose mean rope rotates the queries.
    num_future_positions: int = 512
    # tova (required there, refused elsewhere): the cached tokens kept while generating.
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.method not in PRESS_METHODS:
            raise KVPressError(
                f"unknown kv press {self.method!r}; choose one of {', '.join(PRESS_METHODS)}"
            )
        for name in ("window", "num_sinks", "num_future_positions"):
            check_int(f"kv press {name}", getattr(self, name), error=KVPressError)
        if self.window < 1:
            raise KVPressError(f"kv press window must be >= 1 token, got {self.window}")
        if self.num_sinks < 0:
            raise KVPressError(f"kv press num_sinks must be >= 0, got {self.num_sinks}")
        if not 1 <= self.num_future_positions <= MAX_FUTURE_POSITIONS:
            raise KVPressError(
                f"kv press num_future_positions must be in [1, {MAX_FUTURE_POSITIONS}], got "
                f"{self.num_future_positions}"
            )
        if self.keeps_budget:
            self._check_budget()
        else:
            self._check_ratio()

    @property
    def keeps_budget(self) -> bool:
        """It keeps `budget` tokens while generating (tova), rather than a share of the prompt."""
        return "budget" in METHOD_OPTIONS[self.method].options

    def _check_budget(self) -> None:
        if self.ratio is not None:
            raise KVPressError(
                f"kv press {self.method} keeps a budget of tokens and takes no ratio (got "
                f"{self.ratio!r}): drop the ratio"
            )
        if self.budget is None:
            raise KVPressError(
                f"kv press {self.method} needs a budget: the cached tokens it keeps, e.g. "
                f"KVPress({self.method!r}, budget=256)"
            )
        check_int("kv press budget", self.budget, error=KVPressError)
        if self.budget < 1:
            raise KVPressError(f"kv press budget must be >= 1 token, got {self.budget}")

    def _check_ratio(self) -> None:
        if self.budget is not None:
            raise KVPressError(
                f"kv press {self.method} takes no budget (got {self.budget!r}): it drops a "
                "ratio of the prompt's tokens; only tova keeps a budget"
            )
        ratio = 0.5 if self.ratio is None else self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise KVPressError(f"kv press ratio must be a number, got {describe(ratio)}")
        if not (math.isfinite(ratio) and 0 <= ratio < 1):
            raise KVPressError(
                f"kv press ratio must be in [0, 1) (the fraction of tokens dropped), got {ratio!r}"
            )
        object.__setattr__(self, "ratio", float(ratio))

    def options(self) -> dict[str, int]:
        """The options this press's method reads, by name (`METHOD_OPTIONS`)."""
        return {name: getattr(self, name) for name in METHOD_OPTIONS[self.method].options}

    def num_kept(self, num_tokens: int) -> int:
        """Tokens kept per layer and KV head of `num_tokens` cached ones (at least one)."""
        if self.budget is not None:
            return min(num_tokens, self.budget)
        assert self.ratio is not None
        return max(1, int(num_tokens * (1 - self.ratio)))

    def query_window(self, press_at: int) -> tuple[int, int] | None:
        """[first, end) text positions whose queries a press after `press_at` tokens reads
        (`PressMethod.queries`); None: it reads none."""
        method = METHOD_OPTIONS[self.method]
        if method.queries is None:
            return None
        if method.queries == "newest":
            return press_at - 1, press_at
        sinks = self.num_sinks if "num_sinks" in method.options else 0
        return max(press_at - self.window, sinks), press_at
