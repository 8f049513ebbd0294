"""Press scores against direct, per-head loops over kvpress's definitions."""

from __future__ import annotations

import math

import torch

from kvlm import KVPress
from kvlm.kv.press_scores import SNAPKV_POOL, token_scores


def test_knorm_scores_are_minus_the_key_norm() -> None:
    keys = torch.randn(12, 3, 8)
    scores = token_scores(KVPress("knorm"), keys, None)
    for head in range(3):
        for t in range(12):
            assert math.isclose(
                scores[head, t], -math.sqrt(sum(x * x for x in keys[t, head])), rel_tol=1e-5
            )


def test_streaming_llm_keeps_sinks_and_the_most_recent() -> None:
    press = KVPress("streaming_llm", ratio=0.5, num_sinks=2)
    scores = token_scores(press, torch.randn(10, 2, 4), None)
    kept = scores.topk(press.num_kept(10), dim=-1).indices.sort(dim=-1).values
    assert kept.tolist() == [[0, 1, 7, 8, 9]] * 2


def test_snapkv_matches_a_loop_over_heads_and_window_queries() -> None:
    torch.manual_seed(0)
    n, w, num_heads, groups, hd = 20, 4, 2, 3, 8
    keys = torch.randn(n, num_heads, hd)
    queries = torch.randn(w, num_heads * groups, hd) / math.sqrt(hd)
    scores = token_scores(KVPress("snapkv", window=w), keys, queries)
    expected = torch.zeros(num_heads, n - w)
    for head in range(num_heads):
        for g in range(groups):
            qh = head * groups + g
            mean = torch.zeros(n - w)
            for i in range(w):
                visible = n - w + i + 1  # the query at n - w + i sees keys 0 .. n - w + i
                weights = torch.softmax(keys[:visible, head] @ queries[i, qh], dim=0)
                mean += weights[: n - w] / w
            pad = SNAPKV_POOL // 2
            padded = torch.cat([torch.zeros(pad), mean, torch.zeros(pad)])
            pooled = torch.stack([padded[t : t + SNAPKV_POOL].mean() for t in range(n - w)])
            expected[head] += pooled / groups
    assert torch.allclose(scores[:, : n - w], expected, atol=1e-6)
    window = scores[:, n - w :]
    assert torch.allclose(window, expected.max().expand_as(window))  # the window is kept
