"""Turns a ScheduledBatch into tensors, runs the model once, and returns logits to sample from.

Block tables live in the persistent batch state (`InputBatch`), updated where they changed;
the rest of the step's index arithmetic (positions, the rows new K/V go to) is O(new tokens),
on the host with numpy, moved to the device in one go per tensor. With a paged kernel the
layers read K/V through the block tables; only the torch reference (no cache, KVLM_KERNELS=
torch, a device without a paged kernel) gets per-step gather indices and masks, built here.
Layers only consume the resulting ForwardContext.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kvlm.attention.backend import paged_kernel_for
from kvlm.attention.context import ForwardContext, GroupView, PagedKernel
from kvlm.engine.fused_decode import FusedDecoder, why_not_fused
from kvlm.engine.input_batch import InputBatch
from kvlm.engine.press import keep_window_queries, window_capture
from kvlm.engine.request import Request
from kvlm.engine.scheduler import ScheduledBatch
from kvlm.kernels import paged as paged_kernels
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.store import KVStore
from kvlm.models.transformer import CausalLM

logger = logging.getLogger(__name__)


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T]
    ctx: ForwardContext
    # [num_rows] rows of the hidden states to project: per sampled request its last
    # 1 + len(spec_token_ids) rows
    logits_indices: torch.Tensor
    sampled: list[int]  # positions in the batch of requests that sample a token this step
    # Requests scoring their prompt: (batch index, first position, num rows) of the prompt
    # rows they still need, and those rows' places in the hidden states (None: no such rows)
    prompt_spans: list[tuple[int, int, int]]
    prompt_indices: torch.Tensor | None


@dataclass(frozen=True)
class PromptRows:
    """Logits of the prompt rows a step's scoring requests still need."""

    logits: torch.Tensor  # [num_rows, vocab] float32, the spans' rows one after another
    spans: list[tuple[int, int, int]]  # (batch index, first position, num rows)


@dataclass
class _StepShape:
    """Host-side arrays a group's view is built from (numpy), in its cache indices."""

    starts: np.ndarray  # [B] tokens already cached
    ends: np.ndarray  # [B] sequence lengths after this step
    counts: np.ndarray  # [B] new tokens
    token_offsets: np.ndarray  # [B] first row of each sequence in T
    seq_of_token: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    max_q: int

    def less(self, dropped: np.ndarray) -> _StepShape:
        """The shape in a group's cache indices, `dropped` [B] tokens a press took from each
        sequence there (itself when none)."""
        if not dropped.any():
            return self
        return _StepShape(
            self.starts - dropped,
            self.ends - dropped,
            self.counts,
            self.token_offsets,
            self.seq_of_token,
            self.positions - dropped[self.seq_of_token],
            self.max_q,
        )


def _step_tokens(request: Request, start: int, end: int) -> list[int]:
    """`(token_ids + spec_token_ids)[start:end]`, without copying the whole history."""
    known = len(request.token_ids)
    drafts = request.spec_token_ids[max(start - known, 0) : max(end - known, 0)]
    return request.token_ids[start:end] + drafts


def _logits_rows(batch: ScheduledBatch, sampled: list[int], ends_in_t: np.ndarray) -> np.ndarray:
    """[num rows] places in T of the rows to project: per sampled request its last
    1 + len(spec_token_ids) rows, in order (one row without drafts)."""
    rows = []
    for i in sampled:
        num_rows = 1 + len(batch.requests[i].spec_token_ids)
        assert batch.num_new_tokens[i] >= num_rows, "a step with drafts computes them all"
        rows.append(ends_in_t[i] - num_rows + np.arange(num_rows))
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        device: torch.device,
        specs: tuple[KVCacheSpec, ...],
        stores: list[KVStore] | None,
        cache: KVCacheManager | None,
    ) -> None:
        """`stores` and `cache` are None in no-cache mode (the specs still give the windows)."""
        self.model = model
        self.device = device
        self.specs = specs
        self.stores = stores
        self.cache = cache
        self.group_of_layer = [0] * model.config.num_layers
        for g, spec in enumerate(specs):
            for layer in spec.layer_ids:
                self.group_of_layer[layer] = g
        self.fused: FusedDecoder | None = None  # set by use_fused_decode
        self.input_batch = None if cache is None else InputBatch(specs, cache, device)
        self.paged_attention = None
        if stores is not None:
            self.paged_attention, why = paged_kernel_for(device, stores[0].dtype)
            logger.info("attention reads the KV cache with %s", why)

    def use_fused_decode(self, path: str | None = None) -> str | None:
        """Run decode steps the plan accepts through `FusedDecoder` from now on (kernel `path`,
        None = the process default); returns None, or why it cannot (then nothing changes)."""
        reason = why_not_fused(self.model, path)
        if reason is None:
            self.fused = FusedDecoder(self.model, path)
        return reason

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Returns float32 logits [num_rows, vocab] and which batch rows sample: per sampled
        request, in order, 1 + len(spec_token_ids) consecutive rows (the distribution after
        its last known token, then after each draft; one row without drafts)."""
        step = self.prepare(batch)
        hidden = self._forward(step)  # [T, H]
        keep_window_queries(batch, step.ctx.query_capture)
        return self.model.logits(hidden.index_select(0, step.logits_indices)), step.sampled

    @torch.inference_mode()
    def run_scoring(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int], PromptRows]:
        """As `run`, plus the logits of every prompt row the batch's scoring requests still
        need, projected on their own (so they do not depend on the sampled rows beside them)."""
        step = self.prepare(batch)
        hidden = self._forward(step)  # [T, H]
        keep_window_queries(batch, step.ctx.query_capture)
        logits = self.model.logits(hidden.index_select(0, step.logits_indices))
        rows = hidden[:0] if step.prompt_indices is None else hidden[step.prompt_indices]
        return logits, step.sampled, PromptRows(self.model.logits(rows), step.prompt_spans)

    def _forward(self, step: StepInput) -> torch.Tensor:
        """The model on the step: the fused stack where it accepts the step, else layer by
        layer. Final hidden states [T, H]."""
        fused = self.fused if self.fused is not None and self.fused.accepts(step.ctx) else None
        if step.ctx.query_capture is not None:  # a press's window queries come from attention()
            fused = None
        return self.model(step.input_ids, step.ctx, decoder=fused)

    def prepare(self, batch: ScheduledBatch) -> StepInput:
        for group, source, destination in batch.block_copies:  # before anything reads them
            assert self.stores is not None
            self.stores[group].copy_block(source, destination)
        starts = np.array([r.num_computed_tokens for r in batch.requests], dtype=np.int64)  # [B]
        counts = np.array(batch.num_new_tokens, dtype=np.int64)  # [B]
        ends = starts + counts  # [B] sequence length after this step
        num_groups = len(self.specs)
        # [G, B] tokens a KV press dropped per group: text positions less these are its cache
        # indices (0 in window groups, which a press leaves alone)
        dropped = np.array(
            [r.num_dropped_tokens or (0,) * num_groups for r in batch.requests], dtype=np.int64
        ).T
        num_seqs, max_q = len(counts), int(counts.max())
        token_offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))  # [B] first row in T
        seq_of_token = np.repeat(np.arange(num_seqs), counts)  # [T]
        local = np.arange(counts.sum()) - token_offsets[seq_of_token]  # [T] index in its chunk
        positions = starts[seq_of_token] + local  # [T]
        input_ids = np.concatenate(
            [_step_tokens(r, s, e) for r, s, e in zip(batch.requests, starts, ends, strict=True)]
        )
        sampled = [
            i
            for i, r in enumerate(batch.requests)
            if ends[i] == len(r.token_ids) + len(r.spec_token_ids)
        ]  # requests whose known tokens (and drafts) are all computed after this step
        logits_indices = _logits_rows(batch, sampled, token_offsets + counts)
        prompt_spans = self._prompt_spans(batch, starts, ends) if batch.scores_prompt else []
        prompt_indices = None
        if prompt_spans:
            prompt_indices = np.concatenate(  # [num prompt rows] places in T
                [token_offsets[i] + p - starts[i] + np.arange(n) for i, p, n in prompt_spans]
            )

        text = _StepShape(starts, ends, counts, token_offsets, seq_of_token, positions, max_q)
        # per group in its cache indices: write rows, key counts, masks
        shapes = [text.less(dropped[g]) for g in range(num_groups)]
        paged = self.paged_attention is not None
        if self.input_batch is not None:
            self.input_batch.update([r.request_id for r in batch.requests])
            self.input_batch.set_lengths(np.stack([s.starts for s in shapes]), counts)
        views = [self._view(g, shapes[g], paged) for g in range(num_groups)]
        pad_index = None if max_q == 1 or paged else seq_of_token * max_q + local
        ctx = ForwardContext(
            positions=self._to_device(positions),
            num_seqs=num_seqs,
            max_query_len=max_q,
            query_pad_index=None if pad_index is None else self._to_device(pad_index),
            layer_views=[views[g] for g in self.group_of_layer],
            paged_attention=self._step_kernel() if paged else None,
            query_capture=window_capture(batch, starts, token_offsets, self.device),
        )
        return StepInput(
            self._to_device(input_ids),
            ctx,
            self._to_device(logits_indices),
            sampled,
            prompt_spans,
            None if prompt_indices is None else self._to_device(prompt_indices),
        )

    def _step_kernel(self) -> PagedKernel:
        """The paged kernel the step's layers call: the C++ one as a `StepKernel`, so each
        group's block tables and counts are checked once per step, not once per layer."""
        if self.paged_attention is paged_kernels.paged_attention:
            return paged_kernels.StepKernel()
        return self.paged_attention

    @staticmethod
    def _prompt_spans(
        batch: ScheduledBatch, starts: np.ndarray, ends: np.ndarray
    ) -> list[tuple[int, int, int]]:
        """Per scoring request, the prompt rows it still needs among those computed now."""
        spans = []
        for i, request in enumerate(batch.requests):
            row = request.next_scored_row
            if row is None:
                continue
            first, end = max(int(starts[i]), row), min(int(ends[i]), request.num_prompt_tokens - 1)
            if first < end:
                spans.append((i, first, end - first))
        return spans

    def _view(self, group: int, shape: _StepShape, paged: bool) -> GroupView:
        """The group's view: block tables (views of the persistent state) and write rows with
        a cache, plus the gather index and mask only where the torch reference reads them."""
        spec = self.specs[group]
        places = self._query_places(spec, shape) if spec.num_sinks else None
        if self.input_batch is None:
            return self._reference(group, shape, GroupView(None, None, query_places=places))
        store = self.stores[group]
        num_seqs = len(shape.starts)
        table = self.input_batch.host_table(group, num_seqs)  # [B, max_blocks]
        view = GroupView(
            store=store,
            write_rows=self._to_device(
                self._rows(store, table, shape.seq_of_token, shape.positions)
            ),
            query_places=places,
            block_table=self.input_batch.block_table(group, num_seqs),
            query_start=self.input_batch.query_start(num_seqs),
            num_cached=self.input_batch.num_cached(group, num_seqs),
        )
        return view if paged else self._reference(group, shape, view, table)

    @staticmethod
    def _window_starts(spec: KVCacheSpec, s: _StepShape) -> tuple[np.ndarray, np.ndarray]:
        """[B] per sequence the first key of its first query's window (ws) and how many sinks
        it keeps before it (ns = min(num_sinks, ws)); 0 and 0 without a window."""
        window_start = np.zeros_like(s.starts)
        if spec.window is not None:
            window_start = np.maximum(s.starts - spec.window + 1, 0)  # [B]
        return window_start, np.minimum(spec.num_sinks, window_start)

    def _query_places(self, spec: KVCacheSpec, s: _StepShape) -> torch.Tensor:
        """[T] each query's place in the cache under sinks, ns + p - ws: where the sink keys
        (at places 0 .. ns - 1) see it; every later key at ns + kp - ws is as far from it as
        in the text, so its keys and queries stay roped by text position."""
        window_start, num_sinks = self._window_starts(spec, s)
        seq = s.seq_of_token
        return self._to_device(num_sinks[seq] + s.positions - window_start[seq])

    def _reference(
        self, group: int, shape: _StepShape, view: GroupView, table: np.ndarray | None = None
    ) -> GroupView:
        """`view` with the gather index, key counts and mask of the torch reference: per
        sequence its sinks that lie before the window, then every key from the first query's
        window start to the sequence end, oldest first. `table` None: no cache."""
        spec, s = self.specs[group], shape
        window_start, num_sinks = self._window_starts(spec, s)  # [B], [B]
        num_keys = num_sinks + s.ends - window_start  # [B]
        max_keys = int(num_keys.max())
        index = np.arange(max_keys)  # [S]
        clamped = np.minimum(index[None, :], num_keys[:, None] - 1)  # [B, S]
        in_window = window_start[:, None] + clamped - num_sinks[:, None]
        # [B, S] place in the text of each gathered key (padding repeats the last)
        key_pos = np.where(clamped < num_sinks[:, None], clamped, in_window)
        if table is None:  # no-cache: keys are this step's own tokens
            gather = s.token_offsets[:, None] + key_pos
        else:
            gather = self._rows(view.store, table, np.arange(len(s.starts))[:, None], key_pos)
        if s.max_q > 1 or bool((num_keys != max_keys).any()):
            query_pos = s.starts[:, None] + np.minimum(
                np.arange(s.max_q)[None, :], s.counts[:, None] - 1
            )  # [B, Q]
            qp = query_pos[:, :, None]  # [B, Q, 1]
            kp = key_pos[:, None, :]  # [B, 1, S]
            allowed = (kp <= qp) & (index[None, None, :] < num_keys[:, None, None])
            if spec.window is not None:
                allowed &= (kp > qp - spec.window) | (kp < spec.num_sinks)
            view.mask = self._to_device(allowed[:, None])  # [B, 1, Q, S]
        view.gather_index = self._to_device(gather.reshape(-1))
        view.num_keys = max_keys
        view.key_counts = None if table is None else self._to_device(num_keys)
        if spec.num_sinks:  # [B, 1, 1, S] the gathered sinks by place
            view.sink_keys = self._to_device((index[None, :] < num_sinks[:, None])[:, None, None])
        return view

    @staticmethod
    def _rows(
        store: KVStore, table: np.ndarray, seqs: np.ndarray, positions: np.ndarray
    ) -> np.ndarray:
        """Base row in `store` of token `positions` of sequence `seqs` (broadcast together)."""
        block_size = store.spec.block_size
        block_ids = table[seqs, positions // block_size]
        return block_ids * store.rows_per_block + positions % block_size

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
