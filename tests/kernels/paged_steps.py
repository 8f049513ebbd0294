"""Steps over a paged store with the torch reference beside them, for the paged kernel tests.

A `PagedStep` holds a store whose history was written at random block ids (blocks a window
released are the null block, filled with NaN so that reading one shows), this step's q/k/v,
and the engine's own ForwardContext for the step (`ModelRunner.prepare`: gather index, mask,
block tables, positions), so the reference is exactly what kvlm/attention/backend.py computes.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from kvlm.attention.backend import attention
from kvlm.attention.context import ForwardContext
from kvlm.attention.rope import RotaryEmbedding, apply_rope
from kvlm.engine.runner import ModelRunner
from kvlm.engine.scheduler import ScheduledBatch
from kvlm.kv.block_pool import NULL_BLOCK_ID
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.store import KVStore

LAYER = 1  # of two layers in the group: offsets are not zero


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class PagedStep:
    store: KVStore
    ctx: ForwardContext
    q: torch.Tensor  # [T, nh, hd] before rope
    k: torch.Tensor  # [T, nkv, hd] before rope
    v: torch.Tensor  # [T, nkv, hd]
    rope: RotaryEmbedding
    num_cached: torch.Tensor  # [B]
    query_start: torch.Tensor  # [B + 1]

    @property
    def block_table(self) -> torch.Tensor:
        return self.ctx.layer_views[LAYER].block_table

    def kernel_query(self) -> torch.Tensor:
        """q as the kernel takes it: roped by place in the text, in every group."""
        return apply_rope(self.q, *self.rope.cos_sin(self.ctx.positions))

    def kernel_sink_query(self) -> torch.Tensor | None:
        """sink_q as the kernel takes it: q roped by its place in the cache (sinks only)."""
        places = self.ctx.layer_views[LAYER].query_places
        return None if places is None else apply_rope(self.q, *self.rope.cos_sin(places))


def make_step(
    heads: Heads,
    kv_format: str,
    block_size: int,
    window: int | None,
    num_sinks: int,
    cached: list[int],
    counts: list[int],
    seed: int = 0,
) -> PagedStep:
    """History of `cached[b]` tokens per sequence in the store, `counts[b]` new tokens."""
    gen = torch.Generator().manual_seed(seed)
    spec = KVCacheSpec(
        (0, LAYER), heads.num_kv_heads, heads.head_dim, block_size, kv_format, window, num_sinks
    )
    ends = [c + n for c, n in zip(cached, counts, strict=True)]
    needed = sum(-(-e // block_size) for e in ends)
    store = KVStore(spec, needed + 4, torch.float32, torch.device("cpu"))
    ids = (torch.randperm(needed + 3, generator=gen) + 1).tolist()  # never the null block
    tables = []
    for c, e in zip(cached, ends, strict=True):
        table = [ids.pop() for _ in range(-(-e // block_size))]
        if window is not None:  # released behind the first new token's window, sinks kept
            first_needed = max(c - window + 1, 0) // block_size
            for i in range(spec.num_sink_blocks, first_needed):
                table[i] = NULL_BLOCK_ID
        tables.append(table)
    for table, c in zip(tables, cached, strict=True):
        positions = torch.arange(c)
        blocks = torch.tensor(table, dtype=torch.int64)[positions // block_size]
        live = blocks != NULL_BLOCK_ID
        rows = (blocks * store.rows_per_block + positions % block_size)[live]
        for layer in (0, LAYER):
            shape = (len(rows), heads.num_kv_heads, heads.head_dim)
            store.write(layer, rows, torch.randn(shape, generator=gen),
                        torch.randn(shape, generator=gen))  # fmt: skip
    null_rows = slice(0, store.rows_per_block)
    if store.scales is not None:
        store.scales[null_rows] = float("nan")
    else:
        store.data[null_rows] = float("nan")
    cache = types.SimpleNamespace(  # the cache manager's side the runner reads: fixed tables
        block_tables=lambda rid: [tables[int(rid)]],
        track_table_edits=lambda: None,
        pop_table_edits=dict,
        holds=lambda rid: True,
    )
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_layers=2))
    runner = ModelRunner(model, torch.device("cpu"), (spec,), [store], cache)  # type: ignore[arg-type]
    runner.paged_attention = None  # the torch path's context (gather index, mask): the reference
    requests = [
        types.SimpleNamespace(
            request_id=str(b),
            num_computed_tokens=c,
            num_dropped_tokens=(),  # no KV press
            press_window=None,
            token_ids=[0] * e,
            spec_token_ids=[],
            next_scored_row=None,
        )  # fmt: skip
        for b, (c, e) in enumerate(zip(cached, ends, strict=True))
    ]
    ctx = runner.prepare(ScheduledBatch(requests, list(counts))).ctx  # type: ignore[arg-type]
    total = sum(counts)
    q = torch.randn(total, heads.num_heads, heads.head_dim, generator=gen)
    k = torch.randn(total, heads.num_kv_heads, heads.head_dim, generator=gen)
    v = torch.randn(total, heads.num_kv_heads, heads.head_dim, generator=gen)
    rope = RotaryEmbedding(heads.head_dim, 10000.0)
    starts = torch.tensor([0, *counts]).cumsum(0)
    return PagedStep(store, ctx, q, k, v, rope, torch.tensor(cached), starts)


def reference(step: PagedStep, scale: float, softcap: float | None) -> torch.Tensor:
    """The torch path: writes this step's K/V to the store, gathers, SDPA. [T, nh, hd]"""
    out = attention(step.q, step.k, step.v, LAYER, step.rope, scale, softcap, step.ctx)
    return out.view(step.q.shape)


def streaming_llm(step: PagedStep, scale: float) -> torch.Tensor:
    """StreamingLLM from its definition, not from kvlm's layout (call after `reference`, which
    writes this step's K/V): per sequence with `cached` tokens, the cache holds sinks 0 .. ns - 1
    and the window from ws = max(cached - window + 1, 0) (ns = min(num_sinks, ws)); each key is
    rotated by its place in the cache, each query by the place its own key takes, and a query
    at p sees key kp <= p when kp > p - window or kp < num_sinks. The unrotated keys are the
    stored ones rotated back by their text positions. [T, nh, hd]"""
    spec, rope = step.store.spec, step.rope
    starts, out = step.query_start.tolist(), torch.empty_like(step.q)
    for b, cached in enumerate(step.num_cached.tolist()):
        ws = max(cached - spec.window + 1, 0)
        ns = min(spec.num_sinks, ws)
        queries = step.q[starts[b] : starts[b + 1]]  # [Q, nh, hd] before rope
        p = torch.arange(cached, cached + len(queries))  # [Q] text positions
        kp = torch.cat([torch.arange(ns), torch.arange(ws, int(p[-1]) + 1)])  # [S] in the cache
        blocks = step.block_table[b, kp // spec.block_size]
        keys, values = step.store.gather(
            LAYER, blocks * step.store.rows_per_block + kp % spec.block_size
        )  # [S, nkv, hd]
        keys = apply_rope(keys, *rope.cos_sin(-kp))  # unrotated
        keys = apply_rope(keys, *rope.cos_sin(torch.arange(len(kp))))  # by place in the cache
        queries = apply_rope(queries, *rope.cos_sin(ns + p - ws))
        groups = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        seen = (kp[None, :] <= p[:, None]) & (
            (kp[None, :] > p[:, None] - spec.window) | (kp[None, :] < spec.num_sinks)
        )  # [Q, S]
        scores = torch.einsum("qhd,shd->hqs", queries, keys) * scale
        weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out[starts[b] : starts[b + 1]] = torch.einsum("hqs,shd->qhd", weights, values)
    return out
