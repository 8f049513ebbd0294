"""Press scores against direct, per-head loops over kvpress's definitions."""

from __future__ import annotations

import math

import numpy as np
import torch

from kvlm import KVPress
from kvlm.attention.context import QueryCapture
from kvlm.attention.rope import RotaryEmbedding
from kvlm.kv.press_scores import SNAPKV_POOL, token_scores


def test_knorm_scores_are_minus_the_key_norm() -> None:
    keys = torch.randn(12, 3, 8)
    scores = token_scores(KVPress("knorm"), keys, torch.randn(12, 3, 8), None)
    for head in range(3):
        for t in range(12):
            assert math.isclose(
                scores[head, t], -math.sqrt(sum(x * x for x in keys[t, head])), rel_tol=1e-5
            )


def test_streaming_llm_keeps_sinks_and_the_most_recent() -> None:
    press = KVPress("streaming_llm", ratio=0.5, num_sinks=2)
    scores = token_scores(press, torch.randn(10, 2, 4), torch.randn(10, 2, 4), None)
    kept = scores.topk(press.num_kept(10), dim=-1).indices.sort(dim=-1).values
    assert kept.tolist() == [[0, 1, 7, 8, 9]] * 2


def test_snapkv_matches_a_loop_over_heads_and_window_queries() -> None:
    torch.manual_seed(0)
    n, w, num_heads, groups, hd = 20, 4, 2, 3, 8
    keys = torch.randn(n, num_heads, hd)
    queries = torch.randn(w, num_heads * groups, hd) / math.sqrt(hd)
    scores = token_scores(KVPress("snapkv", window=w), keys, torch.randn(n, num_heads, hd), queries)
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


def mean_rotation(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[hd, hd] kvpress's average rope: the mean over `positions` of cos * I + sin * P, P the
    rotate-half matrix (first half <- -second half, second half <- first half)."""
    half = len(inv_freq)
    angles = positions.double()[:, None] * inv_freq.double()[None, :]  # [F, hd / 2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    eye = torch.eye(2 * half, dtype=torch.float64)
    p = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    p[half:, :half], p[:half, half:] = torch.eye(half), -torch.eye(half)
    return (cos[:, :, None] * eye + sin[:, :, None] * p).mean(dim=0).float()


def test_expected_attention_matches_kvpress_statistics_on_random_tensors() -> None:
    """kvpress's way, per query head: mean and covariance of the pre-rope queries, both
    rotated by the mean rope R; logit mu.k / sqrt(d) + k^T Sigma k / (2 d) over the keys after
    the sinks, softmax, mean over the group, times ||v||; kvlm gets the queries as its capture
    records them (rotated by the mean rope of the 16 positions after the press, scaled)."""
    torch.manual_seed(1)
    n, w, num_heads, groups, hd, sinks = 24, 6, 2, 3, 8, 3
    keys, values = torch.randn(n, num_heads, hd), torch.randn(n, num_heads, hd)
    raw = torch.randn(w, num_heads * groups, hd) + torch.randn(num_heads * groups, hd)
    rope = RotaryEmbedding(hd, theta=10_000.0)
    rotation = mean_rotation(torch.arange(n, n + 16), rope.inv_freq)
    press = KVPress("expected_attention", num_sinks=sinks, num_future_positions=16)
    capture = QueryCapture(torch.arange(w), np.full(w, n), np.full(w, 16))
    capture.add(0, raw, rope, 1 / math.sqrt(hd))  # the press comes after the n tokens
    scores = token_scores(press, keys, values, capture.queries[0])
    expected = torch.zeros(num_heads, n - sinks)
    for head in range(num_heads):
        for g in range(groups):
            q = raw[:, head * groups + g]  # [w, hd]
            mu = rotation @ q.mean(dim=0)
            centred = q - q.mean(dim=0)
            sigma = rotation @ (centred.T @ centred / w) @ rotation.T
            body = keys[sinks:, head]  # [n - s, hd]
            logits = body @ mu / math.sqrt(hd)
            logits += torch.stack([k @ sigma @ k for k in body]) / hd / 2
            expected[head] += torch.softmax(logits, dim=0) / groups
        expected[head] *= values[sinks:, head].norm(dim=-1)
    assert torch.allclose(scores[:, sinks:], expected, rtol=1e-4, atol=1e-7)
    sink_scores = scores[:, :sinks]
    assert torch.allclose(sink_scores, expected.max().expand_as(sink_scores))  # sinks kept


def test_tova_is_the_newest_query_s_softmax_averaged_over_every_query_head() -> None:
    """kvpress's TOVAPress: the last token's attention weights over all n keys (its own
    included in the softmax), the mean over all nh query heads, the same for every KV head;
    the last token itself at the top score."""
    torch.manual_seed(2)
    n, num_heads, groups, hd = 10, 2, 3, 8
    keys = torch.randn(n, num_heads, hd)
    query = torch.randn(1, num_heads * groups, hd) / math.sqrt(hd)
    press = KVPress("tova", budget=4)
    scores = token_scores(press, keys, torch.randn(n, num_heads, hd), query)
    expected = torch.zeros(n)
    for qh in range(num_heads * groups):
        expected += torch.softmax(keys[:, qh // groups] @ query[0, qh], dim=0) / (
            num_heads * groups
        )
    assert scores.shape == (num_heads, n)
    for head in range(num_heads):
        assert torch.allclose(scores[head, : n - 1], expected[: n - 1], atol=1e-6)
        assert torch.isclose(scores[head, n - 1], expected[: n - 1].max())  # the newest kept
    kept = scores.topk(press.num_kept(n), dim=-1).indices.sort(dim=-1).values
    assert kept[0].tolist() == kept[1].tolist()  # one kept set for the layer
    assert n - 1 in kept[0].tolist()
