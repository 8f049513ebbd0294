"""Turns a ScheduledBatch into tensors, runs the model once, and returns logits to sample from.

All index arithmetic (positions, slot mapping, which keys each window reads, masks) happens
here once per step with numpy on the host, then moves to the device in one go per tensor;
layers only consume the resulting ForwardContext.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvlm.attention.context import AttentionView, ForwardContext
from kvlm.engine.scheduler import ScheduledBatch
from kvlm.kv.block_manager import BlockManager
from kvlm.kv.pool import KVPool
from kvlm.models.transformer import CausalLM


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T]
    ctx: ForwardContext
    logits_indices: torch.Tensor  # [num_sampled] rows of the hidden states to project
    sampled: list[int]  # positions in the batch of requests that sample a token this step


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        device: torch.device,
        kv_pool: KVPool | None,
        block_manager: BlockManager | None,
    ) -> None:
        self.model = model
        self.device = device
        self.kv_pool = kv_pool
        self.block_manager = block_manager
        self.windows = sorted(set(model.config.sliding_windows), key=lambda w: w or 0)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Returns float32 logits [num_sampled, vocab] and which batch rows they belong to."""
        step = self.prepare(batch)
        hidden = self.model(step.input_ids, step.ctx)  # [T, H]
        return self.model.logits(hidden.index_select(0, step.logits_indices)), step.sampled

    def prepare(self, batch: ScheduledBatch) -> StepInput:
        starts = np.array([r.num_computed_tokens for r in batch.requests], dtype=np.int64)  # [B]
        counts = np.array(batch.num_new_tokens, dtype=np.int64)  # [B]
        ends = starts + counts  # [B] sequence length after this step
        num_seqs, max_q = len(counts), int(counts.max())
        token_offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))  # [B] first row in T
        seq_of_token = np.repeat(np.arange(num_seqs), counts)  # [T]
        local = np.arange(counts.sum()) - token_offsets[seq_of_token]  # [T] index in its chunk
        positions = starts[seq_of_token] + local  # [T]
        input_ids = np.concatenate(
            [r.token_ids[s:e] for r, s, e in zip(batch.requests, starts, ends, strict=True)]
        )
        sampled = [
            i for i, r in enumerate(batch.requests) if ends[i] == len(r.token_ids)
        ]  # requests whose known tokens are all computed after this step
        logits_indices = token_offsets[sampled] + counts[sampled] - 1

        tables = None
        if self.kv_pool is not None:
            assert self.block_manager is not None
            tables = self._block_tables(batch)
        views = {
            w: self._view(w, starts, ends, counts, token_offsets, max_q, tables)
            for w in self.windows
        }
        pad_index = None if max_q == 1 else seq_of_token * max_q + local
        slot_mapping = None
        if tables is not None:
            slot_mapping = self._slots(tables, seq_of_token, positions)
        ctx = ForwardContext(
            positions=self._to_device(positions),
            num_seqs=num_seqs,
            max_query_len=max_q,
            query_pad_index=None if pad_index is None else self._to_device(pad_index),
            views=views,
            kv_pool=self.kv_pool,
            slot_mapping=None if slot_mapping is None else self._to_device(slot_mapping),
        )
        return StepInput(self._to_device(input_ids), ctx, self._to_device(logits_indices), sampled)

    def _block_tables(self, batch: ScheduledBatch) -> np.ndarray:
        """[B, max_blocks] block ids; short tables are padded by repeating their last block."""
        assert self.block_manager is not None
        rows = [self.block_manager.block_table(r.request_id) for r in batch.requests]
        width = max(len(row) for row in rows)
        return np.array([row + row[-1:] * (width - len(row)) for row in rows], dtype=np.int64)

    def _slots(self, tables: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Pool slot of token `positions` of sequence `rows` (broadcast together)."""
        block_size = self.kv_pool.shape.block_size
        return tables[rows, positions // block_size] * block_size + positions % block_size

    def _view(
        self,
        window: int | None,
        starts: np.ndarray,  # [B] tokens already cached
        ends: np.ndarray,  # [B] sequence lengths after this step
        counts: np.ndarray,  # [B] new tokens
        token_offsets: np.ndarray,  # [B]
        max_q: int,
        tables: np.ndarray | None,  # [B, max_blocks], None in no-cache mode
    ) -> AttentionView:
        # Keys a window can reach: from the first query's window start to the sequence end.
        first_key = np.zeros_like(starts) if window is None else np.maximum(starts - window + 1, 0)
        num_keys = ends - first_key  # [B]
        max_keys = int(num_keys.max())
        offsets = np.arange(max_keys)  # [S]
        key_pos = first_key[:, None] + np.minimum(offsets[None, :], num_keys[:, None] - 1)  # [B, S]
        if tables is None:  # no-cache: keys are this step's own tokens
            gather = token_offsets[:, None] + key_pos
        else:
            gather = self._slots(tables, np.arange(len(starts))[:, None], key_pos)
        query_pos = starts[:, None] + np.minimum(np.arange(max_q)[None, :], counts[:, None] - 1)
        needs_mask = max_q > 1 or bool((num_keys != max_keys).any())
        mask = None
        if needs_mask:
            qp = query_pos[:, :, None]  # [B, Q, 1]
            kp = (first_key[:, None] + offsets[None, :])[:, None, :]  # [B, 1, S]
            allowed = (kp <= qp) & (offsets[None, None, :] < num_keys[:, None, None])
            if window is not None:
                allowed &= kp > qp - window
            mask = self._to_device(allowed[:, None])  # [B, 1, Q, S]
        return AttentionView(self._to_device(gather), mask)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
