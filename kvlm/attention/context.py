"""The per-step attention context: everything a layer needs to read and write the cache.

Built once per step by the model runner and shared by every layer, so no layer recomputes
indices or masks. Notation: B = sequences in the step, T = their new tokens concatenated,
Q = the longest query (1 in a pure decode step), S = keys read for one window size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlm.kv.pool import KVPool


@dataclass
class AttentionView:
    """Which keys the queries read, for one sliding-window size (None = full attention)."""

    # [B, S] rows of the key source: slots of the pool, or (no-cache) rows of this step's tokens
    gather_index: torch.Tensor
    # [B, 1, Q, S] True where a query may attend; None when every query sees all S keys
    mask: torch.Tensor | None


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] absolute position of each new token
    num_seqs: int  # B
    max_query_len: int  # Q
    # [T] position of each token in the padded [B * Q] query layout; None when Q == 1
    query_pad_index: torch.Tensor | None
    views: dict[int | None, AttentionView]  # keyed by sliding window
    kv_pool: KVPool | None  # None: no-cache mode, keys come from this step's tokens only
    slot_mapping: torch.Tensor | None  # [T] pool slot receiving each new token's K/V
