"""The per-step attention context: everything a layer needs to read and write the cache.

Built once per step by the model runner and shared by every layer, so no layer recomputes
indices, masks or rope tables. Notation: B = sequences in the step, T = their new tokens
concatenated, Q = the longest query (1 in a pure decode step), S = keys a group reads per
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from kvlm.attention.rope import RotaryEmbedding, apply_rope
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
        sink_q: torch.Tensor | None = None,  # [T, nh, hd] q roped by place (groups with sinks)
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
    # With sinks: [T] each query's place in the cache, ns + p - ws (runner._query_places):
    # the sink keys (places 0 .. ns - 1) score against q roped there, every other key against
    # q roped by its text position, as the keys are stored (rope is relative)
    query_places: torch.Tensor | None = None
    # [B, max_blocks] int64 block ids of each sequence, the null block past its end; cache only
    block_table: torch.Tensor | None = None
    query_start: torch.Tensor | None = None  # [B + 1] int64 first row in T of each sequence
    # [B] int64 tokens the group caches before the step: the new tokens' first cache index,
    # fewer than their text position where a KV press dropped tokens from the group
    num_cached: torch.Tensor | None = None
    # Torch reference only. [B * S] rows to read keys from: base rows of the group's store, or
    # (no-cache) rows of this step's tokens; sequence b's keys are rows b * S .. b * S + S - 1
    gather_index: torch.Tensor | None = None
    num_keys: int = 0  # S
    # [B, 1, Q, S] True where a query may attend; None when every query sees all S keys
    mask: torch.Tensor | None = None
    key_counts: torch.Tensor | None = None  # [B] int64 keys sequence b reads (<= S)
    # Sinks: [B, 1, 1, S] True where a gathered key is a sink by place (index < ns)
    sink_keys: torch.Tensor | None = None


@dataclass
class QueryCapture:
    """Queries to keep from this step (a KV press's observation window): every attention
    layer records its rows `rows` of q times the softmax scale, row r rotated by the mean rope
    of the `rope_counts[r]` positions from `rope_starts[r]` (rope is linear in its cos and
    sin, so that is the mean rotation). A count of 1 at the row's own position is the rotation
    attention applies (snapkv reads the queries as attention did); expected_attention rotates
    by the mean rope of the positions after the press (kvpress's expected future query)."""

    rows: torch.Tensor  # [R] places in T
    rope_starts: np.ndarray  # [R] int64
    rope_counts: np.ndarray  # [R] int64, each >= 1
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [R, nh, hd]
    _rope_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [T, nh, hd] before rope
        rope: RotaryEmbedding,
        scale: float,
    ) -> None:
        cos, sin = self._tables(rope)
        self.queries[layer_idx] = apply_rope(q.index_select(0, self.rows), cos, sin) * scale

    def _tables(self, rope: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """[R, 1, hd] mean cos and signed sin per row, once per step for each rope."""
        if id(rope) not in self._rope_tables:
            device = self.rows.device
            cos, sin = rope.cos_sin(torch.from_numpy(self.rope_starts).to(device))
            starts, counts = self.rope_starts.tolist(), self.rope_counts.tolist()
            spans = {(s, c) for s, c in zip(starts, counts, strict=True) if c > 1}
            for start, count in spans:
                span_cos, span_sin = rope.cos_sin(torch.arange(start, start + count, device=device))
                rows = (self.rope_starts == start) & (self.rope_counts == count)
                index = torch.from_numpy(np.flatnonzero(rows)).to(device)
                cos[index], sin[index] = span_cos.mean(dim=0), span_sin.mean(dim=0)
            self._rope_tables[id(rope)] = cos, sin
        return self._rope_tables[id(rope)]


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
