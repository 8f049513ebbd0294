"""Scores of a KV press: how much each cached token of one layer matters, per KV head.

Pure functions on tensors (the engine's press step gathers the keys and picks the kept rows).
Higher scores are kept; definitions follow kvpress's presses of the same names (see
`kvlm/sampling/press.py`). Notation: n cached tokens, H KV heads, nh query heads, w window
queries, hd head dim, s sinks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlm.sampling.press import KVPress

SNAPKV_POOL = 5  # kvpress's (and SnapKV's) average-pool width over the scores
# kvpress's ExpectedAttentionPress: scores are (weight + epsilon) * ||v||, epsilon 0 by default
EXPECTED_ATTENTION_EPSILON = 0.0


def token_scores(
    press: KVPress,
    keys: torch.Tensor,  # [n, H, hd] as attention reads them (rope applied)
    values: torch.Tensor,  # [n, H, hd]
    # [w, nh, hd] the queries times the scale: snapkv's window after rope, expected
    # attention's rotated by the mean rope of the positions after the press, tova's newest
    # token (w = 1, its key the last) after rope
    queries: torch.Tensor | None,
) -> torch.Tensor:  # [H, n] float32
    if press.method == "knorm":
        return -keys.float().norm(dim=-1).T
    if press.method == "streaming_llm":
        return _streaming_llm(press, keys.shape[0], keys.shape[1], keys.device)
    assert queries is not None, f"{press.method} scores with the observation window's queries"
    if press.method == "expected_attention":
        return _expected_attention(keys.float(), values.float(), queries.float(), press.num_sinks)
    if press.method == "tova":
        return _tova(keys.float(), queries.float())
    assert press.method == "snapkv", press.method
    return _snapkv(keys.float(), queries.float())


def _streaming_llm(press: KVPress, n: int, num_heads: int, device: torch.device) -> torch.Tensor:
    """1 for the sinks and the most recent tokens, 0 for the `n - kept` tokens after the sinks."""
    scores = torch.ones(num_heads, n, device=device)
    scores[:, press.num_sinks : press.num_sinks + n - press.num_kept(n)] = 0
    return scores


def _snapkv(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Window query i sits at position n - w + i and sees keys up to it (causal); its softmax
    over those keys, averaged over the window, pooled, averaged over each KV head's query
    heads, for the n - w keys before the window; the window's own tokens get the top score."""
    n, num_heads, _ = keys.shape
    w, num_query_heads, _ = queries.shape
    groups = num_query_heads // num_heads
    expanded = keys.repeat_interleave(groups, dim=1)  # [n, nh, hd]
    logits = torch.einsum("qhd,khd->hqk", queries, expanded)  # [nh, w, n]
    place = torch.arange(n, device=keys.device)
    future = place[None, :] > place[n - w :, None]  # [w, n] keys after each window query
    weights = logits.masked_fill(future, float("-inf")).softmax(dim=-1)[..., : n - w]
    scores = F.avg_pool1d(
        weights.mean(dim=1), SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2
    )  # [nh, n - w]
    scores = scores.view(num_heads, groups, n - w).mean(dim=1)  # [H, n - w]
    return F.pad(scores, (0, w), value=scores.max().item())  # [H, n]


def _expected_attention(
    keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, num_sinks: int
) -> torch.Tensor:
    """A future query of head h ~ N(mu_h, Sigma_h), the window's mean and (biased)
    covariance; its logit with key k is then Gaussian with mean mu_h.k and variance
    k^T Sigma_h k, so E[exp(q.k)] = exp(mu_h.k + k^T Sigma_h k / 2). Normalised over the keys
    after the sinks, averaged over each KV head's query heads, times ||v||; the sinks get the
    top score."""
    n, num_heads, _ = keys.shape
    w, num_query_heads, _ = queries.shape
    groups = num_query_heads // num_heads
    mean = queries.mean(dim=0)  # [nh, hd]
    centred = queries - mean
    covariance = torch.einsum("qha,qhb->hab", centred, centred) / w  # [nh, hd, hd]
    body = keys[num_sinks:].repeat_interleave(groups, dim=1)  # [n - s, nh, hd]
    logits = torch.einsum("khd,hd->hk", body, mean)  # [nh, n - s]
    logits += torch.einsum("kha,hab,khb->hk", body, covariance, body) / 2
    weights = logits.softmax(dim=-1).view(num_heads, groups, n - num_sinks).mean(dim=1)
    value_norms = values[num_sinks:].norm(dim=-1).T  # [H, n - s]
    scores = (weights + EXPECTED_ATTENTION_EPSILON) * value_norms
    return F.pad(scores, (num_sinks, 0), value=scores.max().item())  # [H, n]


def _tova(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The newest token's softmax over every cached key (its own the last), averaged over all
    query heads: one score per token, the same for every KV head; the newest token gets the
    top score (kvpress's TOVAPress)."""
    n, num_heads, _ = keys.shape
    (query,) = queries  # [nh, hd]
    groups = query.shape[0] // num_heads
    expanded = keys.repeat_interleave(groups, dim=1)  # [n, nh, hd]
    weights = torch.einsum("hd,khd->hk", query, expanded).softmax(dim=-1)  # [nh, n]
    scores = weights.mean(dim=0)[: n - 1]  # [n - 1]
    scores = torch.cat((scores, scores.max().reshape(1)))  # [n]
    return scores.expand(num_heads, n)  # [H, n]
