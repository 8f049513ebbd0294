"""The per-step attention context: everything a layer needs to read and write the cache.

Built once per step by the model runner and shared by every layer, so no layer recomputes
indices, masks or rope tables. Notation: B = sequences in the step, T = their new tokens
concatenated, Q = the longest query (1 in a pure decode step), S = keys a group reads per
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlm.kv.store import KVStore


@dataclass
class GroupView:
    """How the layers of one cache group write this step's K/V and read their history."""

    # [B * S] rows to read keys from: base rows of the group's store, or (no-cache) rows of
    # this step's tokens; sequence b's keys are rows b * S .. b * S + S - 1, oldest first
    gather_index: torch.Tensor
    num_keys: int  # S
    # [B, 1, Q, S] True where a query may attend; None when every query sees all S keys
    mask: torch.Tensor | None
    store: KVStore | None  # None: no-cache mode, keys come from this step's tokens only
    write_rows: torch.Tensor | None  # [T] base row receiving each new token's K/V
    key_counts: torch.Tensor | None = None  # [B] int64 keys sequence b reads (<= S); cache only
    # [B, max_blocks] int64 block ids of each sequence, padded with the null block; cache only
    # (the paged kernels read K/V through it in place of gather_index)
    block_table: torch.Tensor | None = None
    # Attention sinks: rope by place in the cache. [B * S] positions of the gathered keys and
    # [T] of the queries; None when rope uses each token's place in the text.
    key_positions: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] place of each new token in its sequence
    num_seqs: int  # B
    max_query_len: int  # Q
    # [T] position of each token in the padded [B * Q] query layout; None when Q == 1
    query_pad_index: torch.Tensor | None
    layer_views: list[GroupView]  # per model layer: its group's view (shared by the group)
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
