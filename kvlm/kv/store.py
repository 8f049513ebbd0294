"""The memory of one layer group, in its storage format. It owns tensors and decides nothing.

Layout, block-major so one block of every layer of the group is one contiguous piece:
    data:   [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, row_elements]
    scales: [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, num_scales]  (quantized)
Token `t` of block `b` is addressed by its base row `b * rows_per_block + t`; layer `l`'s K and
V sit `(2 l) * block_size` and `(2 l + 1) * block_size` rows further. The runner computes base
rows once per step; `write` quantizes and `gather` dequantizes, so attention never sees the
storage format. A `WriteHook` (none in the engine) sees each write before attention reads it:
`benchmarks/int4_kv_study.py` fake-quantizes candidate formats into a float store there.

Whole blocks move as *pages*: a block's data bytes then its scale bytes (`block_codec`'s
layout), `[num_blocks, page_nbytes]` uint8, read and written for many blocks in one copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from kvlm.kv.spec import KVCacheSpec


class WriteHook(Protocol):
    def after_write(self, store: KVStore, layer_idx: int, rows: torch.Tensor) -> None:
        """Called by `store.write` once the new tokens' K/V sit at base rows [T] of layer
        `layer_idx`, before attention reads them; it may rewrite any of the layer's rows.
        Only `write` calls it: the fused decode step writes its rows in C++ (no hook)."""


class KVStore:
    def __init__(
        self, spec: KVCacheSpec, num_blocks: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """`dtype`: what `gather` returns (the model's compute dtype)."""
        self.spec = spec
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.format = spec.format
        self.rows_per_block = spec.num_layers * 2 * spec.block_size
        self.layer_index = {layer: i for i, layer in enumerate(spec.layer_ids)}
        head = (spec.num_kv_heads,)
        num_rows = num_blocks * self.rows_per_block
        # Rows of every (block, layer, K/V, token), allocated once.
        row = (self.format.row_elements,)
        self.data = _zeros((num_rows, *head, *row), self.format.storage_dtype, device)
        self.scales = None
        if self.format.is_quantized:
            self.scales = _zeros((num_rows, *head, self.format.num_scales), torch.float16, device)
        # Byte views of the same memory, one row per block: [num_blocks, bytes of its part].
        self._data_pages = self.data.view(torch.uint8).view(num_blocks, -1)
        self._scale_pages = None
        if self.scales is not None:
            self._scale_pages = self.scales.view(torch.uint8).view(num_blocks, -1)
        assert self._data_pages.shape[1] + self._scale_bytes == spec.page_nbytes
        self.write_hook: WriteHook | None = None

    def layer_offsets(self, layer_idx: int) -> tuple[int, int]:
        """Row offsets of K and V of model layer `layer_idx` from a token's base row."""
        local = self.layer_index[layer_idx]
        return 2 * local * self.spec.block_size, (2 * local + 1) * self.spec.block_size

    def write(self, layer_idx: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V. rows: [T] base rows; k, v: [T, num_kv_heads, head_dim]."""
        k_off, v_off = self.layer_offsets(layer_idx)
        for offset, x in ((k_off, k), (v_off, v)):
            data, scales = self.format.quantize(x)
            index = rows + offset
            self.data.index_copy_(0, index, data)
            if scales is not None:
                self.scales.index_copy_(0, index, scales)
        if self.write_hook is not None:
            self.write_hook.after_write(self, layer_idx, rows)

    def gather(self, layer_idx: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at base rows [N] -> two [N, num_kv_heads, head_dim] tensors in `dtype`."""
        k_off, v_off = self.layer_offsets(layer_idx)
        out = []
        for offset in (k_off, v_off):
            index = rows + offset
            data = self.data.index_select(0, index)
            scales = None if self.scales is None else self.scales.index_select(0, index)
            out.append(self.format.dequantize(data, scales, self.dtype))
        return out[0], out[1]

    @property
    def _scale_bytes(self) -> int:
        return 0 if self._scale_pages is None else self._scale_pages.shape[1]

    def read_pages(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the blocks' pages, [len(block_ids), page_nbytes] uint8, on the store's
        device: one slice copy per run of consecutive ids (a conversation's blocks mostly are
        one run), queued, so reading it out to the host can happen on another thread."""
        pages = torch.empty(
            (len(block_ids), self.spec.page_nbytes), dtype=torch.uint8, device=self.data.device
        )
        num_data = self._data_pages.shape[1]
        for first, position, count in _runs(block_ids):
            out = pages[position : position + count]
            out[:, :num_data].copy_(self._data_pages[first : first + count])
            if self._scale_pages is not None:
                out[:, num_data:].copy_(self._scale_pages[first : first + count])
        return pages

    def write_pages(self, block_ids: Sequence[int], pages: torch.Tensor) -> None:
        """Overwrite the blocks with `pages` ([len(block_ids), page_nbytes] uint8, any
        device): one slice copy per run of consecutive ids."""
        assert pages.shape == (len(block_ids), self.spec.page_nbytes), pages.shape
        num_data = self._data_pages.shape[1]
        for first, position, count in _runs(block_ids):
            page = pages[position : position + count]
            self._data_pages[first : first + count].copy_(page[:, :num_data], non_blocking=True)
            if self._scale_pages is not None:
                scales = page[:, num_data:]
                self._scale_pages[first : first + count].copy_(scales, non_blocking=True)

    def compact(
        self,
        source_rows: torch.Tensor,  # [n] base rows of a sequence's cached tokens, in order
        kept: torch.Tensor,  # [num_layers, num_kv_heads, keep] int64 token indices into them
        destination_rows: torch.Tensor,  # [keep] base rows the kept tokens move to, in order
    ) -> None:
        """For every layer of the group and KV head, move the K/V (and scales) of its j-th
        kept token to destination row j, as stored (no requantization). Each layer's K (or V)
        rows are all read before any is written, so destinations may overlap the sources."""
        heads = torch.arange(self.spec.num_kv_heads, device=self.data.device)[:, None]  # [H, 1]
        for local, layer in enumerate(self.spec.layer_ids):
            for offset in self.layer_offsets(layer):
                src = source_rows[kept[local]] + offset  # [H, keep]
                dst = (destination_rows + offset)[None, :]  # [1, keep]
                self.data[dst, heads] = self.data[src, heads]  # [H, keep, row_elements]
                if self.scales is not None:
                    self.scales[dst, heads] = self.scales[src, heads]

    def copy_block(self, source: int, destination: int) -> None:
        """Copy one block's rows (every layer, K and V, scales) onto another, in place."""
        self._data_pages[destination].copy_(self._data_pages[source])
        if self._scale_pages is not None:
            self._scale_pages[destination].copy_(self._scale_pages[source])


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first block id, position in `block_ids`, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for position, block_id in enumerate(block_ids):
        if runs and runs[-1][0] + runs[-1][2] == block_id:
            first, start, count = runs[-1]
            runs[-1] = (first, start, count + 1)
        else:
            runs.append((block_id, position, 1))
    return runs


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose host pages are committed only when written: on the CPU, numpy's
    calloc gets untouched zero pages from the OS, so a 1 GiB pool costs resident memory only
    for the blocks in use (torch.zeros would write every byte at start)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
