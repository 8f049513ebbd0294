"""Work counts against brute force (the runner's rule for the keys each query reads), and the
seeds' 1,000-token figures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvlm.viz.work import LayerGroupShape, Work, keys_seen, recompute_work, step_work


def brute_keys(position: int, window: int | None, num_sinks: int) -> int:
    """As ModelRunner._view: sinks before the window start, then the window up to the query."""
    window_start = 0 if window is None else max(position - window + 1, 0)
    return min(num_sinks, window_start) + position + 1 - window_start


@given(
    start=st.integers(0, 300),
    length=st.integers(0, 300),
    window=st.one_of(st.none(), st.integers(1, 64)),
    num_sinks=st.integers(0, 8),
    num_layers=st.integers(1, 4),
)
def test_closed_form_matches_brute_force(
    start: int, length: int, window: int | None, num_sinks: int, num_layers: int
) -> None:
    sinks = 0 if window is None else num_sinks
    group = LayerGroupShape(num_layers, window, sinks)
    end = start + length
    pairs = num_layers * sum(brute_keys(p, window, sinks) for p in range(start, end))
    assert step_work([group], start, end) == Work(num_layers * length, pairs)
    assert all(keys_seen(p, window, sinks) == brute_keys(p, window, sinks) for p in range(end))


def test_a_thousand_tokens_one_at_a_time() -> None:
    """From a 1-token prompt, 1,000 positions computed one a step: n(n+1)/2 pairs with the
    cache, Σ k(k+1)/2 (≈ n³/6) without: the seeds' "half a million instead of ~500 million"
    counts square matrices; the causal count is 167 million."""
    group = [LayerGroupShape(1, None)]
    with_cache = sum((step_work(group, p, p + 1) for p in range(1000)), Work(0, 0))
    without = sum((recompute_work(group, p + 1) for p in range(1000)), Work(0, 0))
    assert with_cache == Work(1000, 500_500)
    assert without == Work(500_500, 167_167_000)


def test_groups_add_up() -> None:
    groups = [LayerGroupShape(3, None), LayerGroupShape(15, 512)]
    assert step_work(groups, 0, 600).kv_projections == 18 * 600
    assert step_work(groups, 599, 600).attention_pairs == 3 * 600 + 15 * 512


@pytest.mark.parametrize("window", [1, 2, 16])
def test_windows_cap_each_query(window: int) -> None:
    assert keys_seen(1000, window, 0) == window
    assert keys_seen(1000, window, 4) == window + 4
