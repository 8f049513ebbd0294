"""What the cache of one layer group looks like: its storage format, window, sinks and sizes.

Layers whose K/V are kept by the same rules form a group (Gemma 3: its 512-token local layers
and its global layers). A group's spec fixes the bytes of one block, so a memory budget turns
into a number of blocks, and the table manager for the group follows from its window and sinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from kvlm.config import ModelConfig
from kvlm.kv.quant import KVFormat


@dataclass(frozen=True)
class KVCacheSpec:
    layer_ids: tuple[int, ...]  # model layers in this group, ascending
    num_kv_heads: int
    head_dim: int
    block_size: int
    kv_format: str  # "float32" | "bfloat16" | "float16" | "int8" | "int4" | "fp8"
    window: int | None = None  # a query at position p sees keys p - window + 1 .. p
    num_sinks: int = 0  # StreamingLLM: the first tokens every query also sees (needs a window)

    def __post_init__(self) -> None:
        if self.num_sinks and self.window is None:
            raise ValueError(f"{self.num_sinks} attention sinks need a window")

    @cached_property  # read on every allocation (bytes held), so built once
    def format(self) -> KVFormat:
        return KVFormat(self.kv_format, self.head_dim)

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @cached_property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer of the group, scales included."""
        return 2 * self.num_layers * self.num_kv_heads * self.format.nbytes

    @property
    def page_nbytes(self) -> int:
        """Bytes of one block: `block_size` tokens across the group's layers."""
        return self.block_size * self.bytes_per_token

    @property
    def num_sink_blocks(self) -> int:
        return -(-self.num_sinks // self.block_size)

    def max_blocks_held(self, num_tokens: int, num_new_tokens: int = 1) -> int:
        """The most blocks one sequence holds at `num_tokens` tokens, `num_new_tokens` of them
        computed in the last step (they and the window behind the first of them are held)."""
        total = -(-num_tokens // self.block_size)
        if self.window is None:
            return total
        first_needed = max(num_tokens - num_new_tokens - self.window + 1, 0)
        window_blocks = total - first_needed // self.block_size
        return min(total, window_blocks + self.num_sink_blocks)

    @property
    def positions_in_cache(self) -> bool:
        """With sinks, attention goes by each key's place in the cache, not its place in the
        text (keys are stored roped by text position all the same: rope is relative)."""
        return self.num_sinks > 0


def layer_groups(
    config: ModelConfig,
    block_size: int,
    kv_format: str,
    sliding_window: int | None = None,
    num_sinks: int = 0,
) -> tuple[KVCacheSpec, ...]:
    """One spec per distinct (window, sinks), global layers first.

    `sliding_window` caps every layer's window (the model's own, e.g. Gemma 3's 512, stays
    where it is smaller); sinks go with every windowed layer.
    """
    windows = []
    for window in config.sliding_windows:
        if sliding_window is not None:
            window = sliding_window if window is None else min(window, sliding_window)
        windows.append(window)
    specs = []
    for window in sorted(set(windows), key=lambda w: -1 if w is None else w):
        layer_ids = tuple(i for i, w in enumerate(windows) if w == window)
        specs.append(
            KVCacheSpec(
                layer_ids=layer_ids,
                num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
                block_size=block_size,
                kv_format=kv_format,
                window=window,
                num_sinks=num_sinks if window is not None else 0,
            )
        )
    return tuple(specs)
