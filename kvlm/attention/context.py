"""The per-step attention context: everything a layer needs to read and write the cache.

Built once per step by the model runner and shared by every layer, so no layer recomputes
indices, masks or rope tables. Notation: B = sequences in the step, T = their new tokens
concatenated, Q = the longest query (1 in a pure decode step), S = keys a group reads per
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvlm.kv.store import KVStore


class PagedKernel(Protocol):
    """kvlm.kernels.paged.paged_attention (C++) or kvlm.kernels.triton_paged's (CUDA): reads
    K/V through the block table in place; this step's K/V must be written first."""

    def __call__(
        self,
        q: torch.Tensor,  # [T, nh, hd]
        store: KVStore,
        layer_idx: int,
        block_table: torch.Tensor,  # [B, max_blocks]
        query_start: torch.Tensor,  # [B + 1]
        num_cached: torch.Tensor,  # [B]
        scale: float,
        softcap: float | None = None,
        rope: torch.nn.Module | None = None,
    ) -> torch.Tensor: ...  # [T, nh, hd]


@dataclass
class GroupView:
    """How the layers of one cache group write this step's K/V and read their history.

    With a cache, the block table, num_cached and query_start always come (views of the
    runner's persistent batch state); the paged kernels and the fused decode read K/V through
    them. gather_index, num_keys and mask are built only for the torch reference (gather +
    SDPA): no-cache mode, KVLM_KERNELS=torch, or a device without a paged kernel.
    """

    store: KVStore | None  # None: no-cache mode, keys come from this step's tokens only
    write_rows: torch.Tensor | None  # [T] base row receiving each new token's K/V
    # With sinks, rope by place in the cache (keys stored unrotated), not in the text
    rope_in_cache: bool = False
    # [B, max_blocks] int64 block ids of each sequence, the null block past its end; cache only
    block_table: torch.Tensor | None = None
    query_start: torch.Tensor | None = None  # [B + 1] int64 first row in T of each sequence
    # [B] int64 tokens cached before the step: the new tokens' first cache index, fewer than
    # their text position when a KV press dropped tokens (the same tensor in every group)
    num_cached: torch.Tensor | None = None
    # Torch reference only. [B * S] rows to read keys from: base rows of the group's store, or
    # (no-cache) rows of this step's tokens; sequence b's keys are rows b * S .. b * S + S - 1
    gather_index: torch.Tensor | None = None
    num_keys: int = 0  # S
    # [B, 1, Q, S] True where a query may attend; None when every query sees all S keys
    mask: torch.Tensor | None = None
    key_counts: torch.Tensor | None = None  # [B] int64 keys sequence b reads (<= S)
    # Sinks: [B * S] places in the cache of the gathered keys and [T] of the queries
    key_positions: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None


@dataclass
class QueryCapture:
    """Queries to keep from this step (a KV press's observation window): every attention
    layer records its rows `rows` of q, after rope and times the softmax scale."""

    rows: torch.Tensor  # [R] places in T
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [R, nh, hd]

    def add(self, layer_idx: int, q: torch.Tensor, scale: float) -> None:
        self.queries[layer_idx] = q.index_select(0, self.rows) * scale


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] place of each new token in its sequence's text (rope)
    num_seqs: int  # B
    max_query_len: int  # Q
    # [T] position of each token in the padded [B * Q] query layout; None when Q == 1
    query_pad_index: torch.Tensor | None
    layer_views: list[GroupView]  # per model layer: its group's view (shared by the group)
    # The paged kernel every cached layer reads K/V with this step; None: the torch reference
    paged_attention: PagedKernel | None = None
    query_capture: QueryCapture | None = None  # None: no press reads this step's queries
    _rope_tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )

    def rope_tables(
        self, rope: torch.nn.Module, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope.cos_sin(positions)`, computed once per step for each rope and positions."""
        key = (id(rope), id(positions))
        if key not in self._rope_tables:
            self._rope_tables[key] = rope.cos_sin(positions)
        return self._rope_tables[key]
