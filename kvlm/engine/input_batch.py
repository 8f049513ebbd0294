"""Persistent batch state: a row per running request of block tables, kept across steps.

The runner's step inputs that grow with context are the block tables. Rebuilding them each
step costs host work in proportion to every sequence's length; here each request's row is
written once when it joins, then only changed where its tables changed, so a step costs work
in proportion to the batch (vLLM v1's InputBatch / BlockTable idea):
- a request joins: its row is written from the cache manager's tables, once;
- it grows: only the new entries past the row's length are copied;
- a window lets go of its oldest blocks: a window group's table is always its sink blocks,
  then nulled entries, then the blocks the window still reads, so the nulled run is followed
  from where it ended last step, each entry once in the request's life;
- anything else (a free, a rollback, a copy-on-write, a fork) the cache manager reports
  (`KVCacheManager.pop_table_edits`) with the first index that may differ, rewritten from it;
- a request whose tables were freed loses its row; the last row moves into the hole, so
  rows stay dense, and each step puts the scheduled requests in rows 0 .. B - 1, in batch
  order (rows only move when the batch's order changes).
Unused entries hold the null block, so `block_table(g, B)` is the rows' contiguous prefix,
[B, capacity] with no copy, and the paged kernels and the fused decode read it as it is.
Notation: B sequences in the step, G cache groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvlm.kv.block_pool import NULL_BLOCK_ID
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.spec import KVCacheSpec


class InputBatch:
    def __init__(
        self,
        specs: Sequence[KVCacheSpec],
        cache: KVCacheManager,
        device: torch.device,
        max_num_seqs: int = 32,
        max_blocks_per_seq: int = 64,
    ) -> None:
        """Buffers for `max_num_seqs` rows of `max_blocks_per_seq` entries, both doubled when
        a step needs more (pinned host memory when `device` is a GPU)."""
        self.cache = cache
        self.device = torch.device(device)
        self.num_groups = len(specs)
        # Per group: first table index a window may null (after the sinks); None: full group
        self._sink_blocks = [None if s.window is None else s.num_sink_blocks for s in specs]
        self.request_ids: list[str] = []  # per row
        self.row_of: dict[str, int] = {}
        self._tables: list[torch.Tensor] = []  # per group [capacity rows, capacity blocks] int64
        self._num_entries = np.zeros((0, self.num_groups), np.int64)  # [rows, G] filled
        self._nulled_to = np.zeros((0, self.num_groups), np.int64)  # [rows, G] nulls followed
        self._num_cached = self._host(self.num_groups, 0)  # [G, rows]
        self._query_start = self._host(1)  # [rows + 1]
        cache.track_table_edits()
        self._resize(max_num_seqs, max_blocks_per_seq)

    @property
    def num_rows(self) -> int:
        return len(self.request_ids)

    @property
    def max_blocks_per_seq(self) -> int:
        return self._tables[0].shape[1]

    # --- per step -------------------------------------------------------------------------

    def update(self, request_ids: Sequence[str]) -> None:
        """Bring the rows up to date with the cache manager's tables and put the step's
        requests (each held by the cache) in rows 0 .. B - 1, in this order."""
        for request_id, first in self.cache.pop_table_edits().items():
            if request_id not in self.row_of:
                continue
            if self.cache.holds(request_id):
                self._rewrite(self.row_of[request_id], first)
            else:
                self._remove(request_id)
        for position, request_id in enumerate(request_ids):
            if request_id not in self.row_of:
                self._add(request_id)
            row = self.row_of[request_id]
            if row != position:
                self._swap(row, position)
            self._sync(position)

    def set_lengths(self, num_cached: np.ndarray, counts: np.ndarray) -> None:
        """The step's num_cached [G, B] (tokens each group caches before it: fewer than the
        text where a press compacted the group) and new tokens [B] per row."""
        num_seqs = num_cached.shape[1]
        self._num_cached.numpy()[:, :num_seqs] = num_cached
        starts = self._query_start.numpy()
        starts[0] = 0
        np.cumsum(counts, out=starts[1 : num_seqs + 1])

    def block_table(self, group: int, num_seqs: int) -> torch.Tensor:
        """[B, max_blocks_per_seq] int64 block ids of rows 0 .. B - 1 on the device (a view
        of the persistent buffer on the CPU), the null block past each table's end."""
        return self._to_device(self._tables[group][:num_seqs])

    def host_table(self, group: int, num_seqs: int) -> np.ndarray:
        """The same rows as a numpy view on the host (for write rows and the reference)."""
        return self._tables[group].numpy()[:num_seqs]

    def num_cached(self, group: int, num_seqs: int) -> torch.Tensor:
        """[B] int64 tokens the group caches before the step (`set_lengths`)."""
        return self._to_device(self._num_cached[group, :num_seqs])

    def query_start(self, num_seqs: int) -> torch.Tensor:
        """[B + 1] int64 first row in T of each sequence's new tokens, then T."""
        return self._to_device(self._query_start[: num_seqs + 1])

    # --- rows -----------------------------------------------------------------------------

    def _add(self, request_id: str) -> None:
        row = self.num_rows
        widest = max(len(t) for t in self.cache.block_tables(request_id))
        self._resize(row + 1, widest)
        self.request_ids.append(request_id)
        self.row_of[request_id] = row
        self._num_entries[row] = 0
        self._nulled_to[row] = [s or 0 for s in self._sink_blocks]
        self._sync(row)

    def _remove(self, request_id: str) -> None:
        """Free the request's row; the last row moves into it."""
        row, last = self.row_of.pop(request_id), self.num_rows - 1
        moved = self.request_ids.pop()
        if row != last:
            for table in self._tables:
                table[row] = table[last]
            self._num_entries[row] = self._num_entries[last]
            self._nulled_to[row] = self._nulled_to[last]
            self.request_ids[row] = moved
            self.row_of[moved] = row
        for table, width in zip(self._tables, self._num_entries[last], strict=True):
            table[last, :width] = NULL_BLOCK_ID

    def _swap(self, a: int, b: int) -> None:
        for table in self._tables:
            table[[a, b]] = table[[b, a]]
        for meta in (self._num_entries, self._nulled_to):
            meta[[a, b]] = meta[[b, a]]
        ids = self.request_ids
        ids[a], ids[b] = ids[b], ids[a]
        self.row_of[ids[a]], self.row_of[ids[b]] = a, b

    def _rewrite(self, row: int, first: int) -> None:
        """The row's entries from table index `first` on, rewritten from the cache manager."""
        tables = self.cache.block_tables(self.request_ids[row])
        self._resize(self.num_rows, max(len(t) for t in tables))
        for g, live in enumerate(tables):
            stored, entries = self._tables[g].numpy()[row], int(self._num_entries[row, g])
            start = min(first, len(live), entries)
            stored[start : len(live)] = live[start:]
            stored[len(live) : entries] = NULL_BLOCK_ID
            self._num_entries[row, g] = len(live)
            sinks = self._sink_blocks[g]
            if sinks is not None:  # nulls are followed from past the sinks again, at most
                self._nulled_to[row, g] = max(min(self._nulled_to[row, g], start), sinks)
        self._sync(row)

    def _sync(self, row: int) -> None:
        """Copy the entries the row lacks past its end and follow a window's new nulls."""
        tables = self.cache.block_tables(self.request_ids[row])
        for g, live in enumerate(tables):
            entries = int(self._num_entries[row, g])
            if len(live) > entries:
                if len(live) > self.max_blocks_per_seq:
                    self._resize(self.num_rows, len(live))
                self._tables[g].numpy()[row, entries : len(live)] = live[entries:]
                self._num_entries[row, g] = entries = len(live)
            assert len(live) == entries, "a table shrank without an edit from the cache manager"
            if self._sink_blocks[g] is None:
                continue
            stored, index = self._tables[g].numpy()[row], int(self._nulled_to[row, g])
            while index < entries and live[index] == NULL_BLOCK_ID:
                stored[index] = NULL_BLOCK_ID
                index += 1
            self._nulled_to[row, g] = index

    # --- buffers --------------------------------------------------------------------------

    def _resize(self, num_rows: int, num_blocks: int) -> None:
        """Grow the buffers (doubling) to hold `num_rows` rows of `num_blocks` entries."""
        old_rows = self._num_entries.shape[0]
        old_blocks = self._tables[0].shape[1] if self._tables else 0
        rows, blocks = max(old_rows, 1), max(old_blocks, 1)
        while rows < num_rows:
            rows *= 2
        while blocks < num_blocks:
            blocks *= 2
        if (rows, blocks) == (old_rows, old_blocks):
            return
        tables = []
        for g in range(self.num_groups):
            table = self._host(rows, blocks)
            if self._tables:
                table[:old_rows, :old_blocks] = self._tables[g]
            tables.append(table)
        self._tables = tables
        for name in ("_num_entries", "_nulled_to"):
            grown = np.zeros((rows, self.num_groups), np.int64)
            grown[:old_rows] = getattr(self, name)
            setattr(self, name, grown)
        self._num_cached = self._host(self.num_groups, rows)
        self._query_start = self._host(rows + 1)

    def _host(self, *shape: int) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.full(shape, NULL_BLOCK_ID, dtype=torch.int64, pin_memory=pin)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.device.type == "cpu" else x.to(self.device, non_blocking=True)
