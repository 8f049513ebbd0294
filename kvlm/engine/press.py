"""The KV press step: once a request's computed tokens reach `press_at`, score its cached
tokens per layer and KV head, keep the same number in each, and compact them into fewer
blocks. Most presses run once, after the prompt; tova's runs there and again each time the
cache holds its budget plus a block (`_next_press_at`).

A press compresses the full-attention groups only; window groups (Gemma 3's 512-token local
layers) keep their cache as it is and go on letting go of what falls behind the window. That
is kvpress's rule for Gemma 3: `BasePress.__call__` (kvpress 0.5.5, kvpress/presses/
base_press.py) registers no hook on a layer whose `self_attn.is_sliding`, warning "Compression
in Gemma3 is only applied to layer without sliding window attention" (it tests for
Gemma3ForConditionalGeneration; benchmarks/kvpress_anchor.py applies the rule to the text-only
Gemma3ForCausalLM that Gemma 3 270M loads as). For every full-attention group, layer and KV
head, its j-th kept token (in cache order) moves to cache row j, so the request keeps only
ceil(kept / block_size) blocks there; the door (`KVCacheManager.compact`) returns the rest to
the pool at once and the persistent batch state follows the reported table edit. Keys were
stored with rope by text position, so each kept key keeps its true position; the request
records per group how many tokens were dropped (`Request.num_dropped_tokens`, 0 in a window
group), and from then on a group's cache index is the text position less that
(engine/runner.py). snapkv, expected_attention and tova read queries (`KVPress.query_window`),
recorded by attention() while their rows are computed (`window_capture`,
`keep_window_queries`): snapkv's and tova's (the newest token's) rotated at their own
positions, expected_attention's by the mean rope of the `num_future_positions` positions
after the press.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from kvlm.attention.context import QueryCapture
from kvlm.engine.request import Request
from kvlm.engine.scheduler import ScheduledBatch
from kvlm.kv.block_pool import OutOfBlocksError
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.press_scores import token_scores
from kvlm.kv.store import KVStore
from kvlm.sampling.press import METHOD_OPTIONS, KVPress

logger = logging.getLogger(__name__)


class PressedEngine(Protocol):
    """What `why_no_press` reads of an `LLMEngine` (the engine imports this module)."""

    kv_cache: KVCacheManager | None
    kv_specs: Sequence[Any]  # KVCacheSpec per cache group
    speculative: Any  # the speculative decoder, or None


def why_no_press(engine: PressedEngine, press: KVPress, press_at: int) -> str | None:
    """Why `engine` cannot press a request whose press runs after `press_at` tokens, in
    words for its InputError; None when it can."""
    if engine.kv_cache is None:
        return "a press compresses the KV cache; this engine runs without one (use_cache=False)"
    if all(spec.window is not None for spec in engine.kv_specs):
        # --sliding-window caps every layer's window and --attention-sinks needs it, so an
        # engine with sinks has no full-attention group: this refuses sinks too
        windows = sorted({spec.window for spec in engine.kv_specs})
        return (
            f"every layer keeps a window ({', '.join(map(str, windows))} tokens); a press "
            "compresses the full-attention layers and leaves windowed ones as they are: drop "
            "--sliding-window / --attention-sinks, or use a model with global layers"
        )
    if engine.speculative is not None:
        return "speculative decoding rolls back by text position; use one or the other"
    if press.method == "snapkv" and press_at <= press.window:
        return (
            f"snapkv scores the {press_at} tokens before the press by a window of "
            f"{press.window}: give more tokens than the window or a smaller window"
        )
    if press.method == "expected_attention" and press_at <= press.num_sinks:
        return (
            f"expected_attention keeps the first {press.num_sinks} tokens and scores the "
            f"others, but the press comes after {press_at}: give more tokens or fewer num_sinks"
        )
    block_size = engine.kv_specs[0].block_size
    if press.budget is not None and press.budget < block_size:
        return (
            f"a budget of {press.budget} tokens is under one block of {block_size} (each "
            f"press frees a block): give budget >= {block_size}"
        )
    return None


def window_capture(
    batch: ScheduledBatch,
    starts: np.ndarray,  # [B] text position of each chunk's first token
    token_offsets: np.ndarray,  # [B] first row of each chunk in T
    device: torch.device,
) -> QueryCapture | None:
    """The rows of this step whose queries a pending press reads (`Request.press_window`),
    each with the rope it wants (`QueryCapture`); None: none."""
    rows, rope_starts, rope_counts = [], [], []
    for i, (request, count) in enumerate(zip(batch.requests, batch.num_new_tokens, strict=True)):
        window = request.press_window
        first, end = _window_rows(request, int(starts[i]), count)
        if first == end:
            continue  # no pending window, or this chunk misses it
        if first == window[0]:
            request.press_queries.clear()  # the window starts in this chunk: (re)computed
        rows.append(token_offsets[i] + np.arange(first, end) - starts[i])
        press = request.params.kv_press
        assert press is not None and request.press_at is not None
        if METHOD_OPTIONS[press.method].future_rope:
            # the mean rope of the positions after the press (kvpress: its prompt's length on)
            rope_starts.append(np.full(end - first, request.press_at))
            rope_counts.append(np.full(end - first, press.num_future_positions))
        else:  # snapkv, tova: each query as attention rotates it, at its own position
            rope_starts.append(np.arange(first, end))
            rope_counts.append(np.ones(end - first, np.int64))
    index = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if not len(index):
        return None
    return QueryCapture(
        torch.from_numpy(index).to(device), np.concatenate(rope_starts), np.concatenate(rope_counts)
    )


def keep_window_queries(batch: ScheduledBatch, capture: QueryCapture | None) -> None:
    """After the forward (before the step's tokens are counted): append to each request its
    rows of the captured queries, in the order `window_capture` listed them."""
    if capture is None:
        return
    start = 0
    for request, count in zip(batch.requests, batch.num_new_tokens, strict=True):
        first, end = _window_rows(request, request.num_computed_tokens, count)
        if first < end:
            for layer, queries in capture.queries.items():
                part = queries[start : start + end - first]
                request.press_queries.setdefault(layer, []).append(part)
            start += end - first


def _window_rows(request: Request, start: int, count: int) -> tuple[int, int]:
    """[first, end) text positions of the chunk [start, start + count) in the request's
    pending press window (empty when it has none or the chunk misses it)."""
    window = request.press_window
    if window is None:
        return 0, 0
    first, end = max(window[0], start), min(window[1], start + count)
    return (first, end) if first < end else (0, 0)


def apply_press(request: Request, cache: KVCacheManager, stores: Sequence[KVStore]) -> None:
    """Run the request's press on its cached tokens (see the module docstring), then set
    where its next press runs. When the kept blocks cannot be unshared (the pool is full)
    the request stays whole, with a warning naming it."""
    press = request.params.kv_press
    assert press is not None and request.press_pending
    assert request.num_computed_tokens == request.press_at, "a press runs at press_at"
    queries = {layer: torch.cat(parts) for layer, parts in request.press_queries.items()}
    request.press_queries.clear()
    pressed = cache.compactable_groups
    num_tokens = request.num_cache_tokens(pressed[0])
    keep = press.num_kept(num_tokens)
    if keep < num_tokens:
        _compact(request, cache, [stores[g] for g in pressed], press, queries, keep)
    request.press_at = _next_press_at(request, pressed[0], cache.block_size)


def _next_press_at(request: Request, pressed: int, block_size: int) -> int | None:
    """Where the request's next press runs: None (a press runs once), or for a budget (tova)
    when its cache holds the budget plus a block, and at least a block on (a press the full
    pool refused is tried again a block later); `pressed`: a group the press compacts."""
    press = request.params.kv_press
    assert press is not None
    if press.budget is None:
        return None
    room = max(press.budget + block_size - request.num_cache_tokens(pressed), block_size)
    return request.num_computed_tokens + room


def _compact(
    request: Request,
    cache: KVCacheManager,
    stores: Sequence[KVStore],  # those of the groups the press compacts, in group order
    press: KVPress,
    queries: dict[int, torch.Tensor],  # layer -> [w, nh, hd] the queries the press reads
    keep: int,
) -> None:
    """Score the request's cached tokens in each group the press compacts, keep `keep` per
    layer and KV head and move them to its first cache rows; those groups' tables shrink to
    those rows' blocks (the window groups keep theirs)."""
    pressed = cache.compactable_groups
    num_tokens = request.num_cache_tokens(pressed[0])
    assert all(request.num_cache_tokens(g) == num_tokens for g in pressed), "pressed alike"
    block_size = cache.block_size
    positions = np.arange(num_tokens)  # cache rows
    tables = [cache.block_tables(request.request_id)[g] for g in pressed]
    sources, kept = [], []
    for store, table in zip(stores, tables, strict=True):
        rows = np.asarray(table)[positions // block_size] * store.rows_per_block
        source = torch.from_numpy(rows + positions % block_size).to(store.data.device)
        sources.append(source)  # [n] base rows
        per_layer = []
        for layer in store.spec.layer_ids:
            keys, values = store.gather(layer, source)  # [n, H, hd]
            scores = token_scores(press, keys, values, queries.get(layer))  # [H, n]
            per_layer.append(scores.topk(keep, dim=-1).indices.sort(dim=-1).values)
        kept.append(torch.stack(per_layer))  # [layers, H, keep]
    try:
        cache.compact(request.request_id, keep)
    except OutOfBlocksError as e:
        logger.warning("request %s is not compressed: %s", request.request_id, e)
        return
    cache_rows = np.arange(keep)
    tables = [cache.block_tables(request.request_id)[g] for g in pressed]
    for store, source, index, table in zip(stores, sources, kept, tables, strict=True):
        rows = np.asarray(table)[cache_rows // block_size] * store.rows_per_block
        destination = torch.from_numpy(rows + cache_rows % block_size).to(source.device)
        store.compact(source, index, destination)
    dropped = list(request.num_dropped_tokens or [0] * len(cache.specs))
    for g in pressed:
        dropped[g] += num_tokens - keep
    request.num_dropped_tokens = tuple(dropped)
