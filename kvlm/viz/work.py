"""The work a KV cache saves, counted for a real run: K/V projections and attention pairs.

With a cache, a step projects K and V only for the tokens it computes, and each of their
queries meets the keys its layer keeps (all earlier tokens, or a window plus sinks). Without
one (kvlm's no-cache baseline), every step that yields a token runs the whole sequence again:
every token's K and V, every query against every key it may see. For 1,000 tokens generated
one at a time under full attention that is ~500 thousand query-key pairs per layer and head
with the cache and ~167 million without (n²/2 against n³/6).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerGroupShape:
    num_layers: int
    window: int | None  # a query at position p sees keys p - window + 1 .. p
    num_sinks: int = 0  # and, under a window, the first `num_sinks` tokens


@dataclass(frozen=True)
class Work:
    kv_projections: int  # tokens whose K and V were projected, summed over layers
    attention_pairs: int  # (query, key) pairs scored, summed over layers, per attention head

    def __add__(self, other: Work) -> Work:
        return Work(
            self.kv_projections + other.kv_projections,
            self.attention_pairs + other.attention_pairs,
        )


NO_WORK = Work(0, 0)


def keys_seen(position: int, window: int | None, num_sinks: int) -> int:
    """Keys the query at `position` attends to: itself and what its layer keeps before it."""
    if window is None or position < window:
        return position + 1
    return window + min(num_sinks, position - window + 1)


def _pairs(start: int, end: int, window: int | None, num_sinks: int) -> int:
    """Σ keys_seen(p) for p in [start, end), in closed form."""
    if end <= start:
        return 0
    if window is None:
        return (end * (end + 1) - start * (start + 1)) // 2
    split = min(max(start, window), end)  # below it every query sees all earlier keys
    total = _pairs(start, split, None, 0)
    # From `split` on: window keys plus sinks, the sinks fully counted once p >= window + sinks - 1
    for_sinks = sum(
        min(num_sinks, p - window + 1) for p in range(split, min(end, window + num_sinks))
    )
    full_sinks = max(end - max(split, window + num_sinks), 0) * num_sinks
    return total + (end - split) * window + for_sinks + full_sinks


def step_work(groups: list[LayerGroupShape], start: int, end: int) -> Work:
    """Work of computing tokens [start, end) against a cache holding everything before them."""
    projections = sum(g.num_layers for g in groups) * (end - start)
    pairs = sum(g.num_layers * _pairs(start, end, g.window, g.num_sinks) for g in groups)
    return Work(projections, pairs)


def recompute_work(groups: list[LayerGroupShape], num_tokens: int) -> Work:
    """Work of one no-cache step: the whole `num_tokens`-token sequence from scratch."""
    return step_work(groups, 0, num_tokens)
