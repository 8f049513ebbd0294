"""The KV pool: the engine's memory. It owns tensors and decides nothing.

For every layer, K and V live in blocks of `block_size` token slots:
`[num_blocks, block_size, num_kv_heads, head_dim]`. Slot `s` is token `s % block_size` of block
`s // block_size`; the block manager decides which blocks a sequence owns, the runner turns that
into slot indices, and attention writes and reads by slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlm.config import ModelConfig


@dataclass(frozen=True)
class PoolShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    return block_size * config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())


class KVPool:
    def __init__(self, shape: PoolShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        # [2 (K, V), num_layers, num_slots, num_kv_heads, head_dim], allocated once.
        self.data = torch.zeros(
            2,
            shape.num_layers,
            shape.num_slots,
            shape.num_kv_heads,
            shape.head_dim,
            dtype=dtype,
            device=device,
        )

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer by slot: two `[num_slots, num_kv_heads, head_dim]` views."""
        return self.data[0, layer_idx], self.data[1, layer_idx]

    def write(
        self, layer_idx: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store new tokens' K/V. slot_mapping: [T]; k, v: [T, num_kv_heads, head_dim]."""
        k_slots, v_slots = self.layer(layer_idx)
        k_slots.index_copy_(0, slot_mapping, k)
        v_slots.index_copy_(0, slot_mapping, v)

    def blocks(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer by block: `[num_blocks, block_size, num_kv_heads, head_dim]`."""
        s = self.shape
        view = (s.num_blocks, s.block_size, s.num_kv_heads, s.head_dim)
        k_slots, v_slots = self.layer(layer_idx)
        return k_slots.view(view), v_slots.view(view)
