"""Record one generation step by step: which tokens each step computed, the block tables, and
real K/V values read back from the cache, plus the work the cache saved.

Only the engine being recorded is touched: its scheduler's `update_after_step` is wrapped on
that one instance, so K/V are read right after the forward pass wrote them and before a window
lets their blocks go. Nothing is added to the engine's code path when not visualizing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvlm.engine.engine import LLMEngine
from kvlm.engine.request import Request
from kvlm.engine.scheduler import ScheduledBatch
from kvlm.sampling import SamplingParams
from kvlm.viz.work import NO_WORK, LayerGroupShape, Work, recompute_work, step_work


@dataclass(frozen=True)
class GroupRecord:
    label: str  # e.g. "30 layers, window 64 + 4 sinks, int8"
    layer_ids: list[int]
    window: int | None
    num_sinks: int
    block_size: int


@dataclass
class StepRecord:
    kind: str  # "prefill" (a chunk of the prompt) or "decode" (the last sampled token)
    start: int  # positions [start, end) were computed in this step
    end: int
    sampled: int | None  # the token sampled after this step, if one was
    tables_written: list[list[int]]  # per group, the block table during the forward pass
    tables_after: list[list[int]]  # per group, after a window let blocks go (0: let go)
    with_cache: Work  # this step's work
    without_cache: Work  # what a no-cache engine spends for the same output


@dataclass
class Recording:
    model: str
    settings: dict[str, str]  # e.g. {"kv_cache_dtype": "int8", "sliding_window": "64"}
    token_ids: list[int]
    token_texts: list[str]
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose K/V came from the prefix cache
    groups: list[GroupRecord]
    kv_head: int
    channels: list[int]  # which channels of the head the K/V values show
    # [num_layers][num_tokens][len(channels)], as stored (keys after rope; before it with sinks);
    # None for tokens whose K/V were reused from the prefix cache, not computed in this run
    keys: list[list[list[float] | None]] = field(default_factory=list)
    values: list[list[list[float] | None]] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)


def record_generation(
    engine: LLMEngine,
    prompt: str,
    params: SamplingParams,
    settings: dict[str, str],
    cached_prefix: str | None = None,
    num_channels: int = 8,
    on_step: Callable[[StepRecord], None] | None = None,
) -> Recording:
    """Generate for `prompt` (after `cached_prefix`, whose blocks are cached first by a run of
    its own) and record every step. The engine must be idle and have a KV cache."""
    if engine.kv_cache is None:
        raise ValueError("visualize shows the KV cache: run the engine with use_cache=True")
    if engine.has_unfinished():
        raise ValueError("the engine is busy: record on an idle engine")
    if cached_prefix:
        _run_to_end(engine, engine.add_request(cached_prefix, None, SamplingParams(max_tokens=1)))
        prompt = cached_prefix + prompt
    request_id = engine.add_request(prompt, None, params)
    request = engine.requests[request_id]
    recorder = _Recorder(engine, request, settings, num_channels, on_step)
    scheduler = engine.scheduler
    original = scheduler.update_after_step
    scheduler.update_after_step = recorder.wrap(original)  # this engine only; undone below
    try:
        while request_id in engine.requests:
            engine.step()
            recorder.finish_step()
    finally:
        del scheduler.update_after_step  # the class's method again
    recorder.recording.token_ids = list(request.token_ids)
    recorder.recording.token_texts = [
        engine.tokenizer.decode([t], skip_special_tokens=False) for t in request.token_ids
    ]
    recorder.recording.num_cached_tokens = request.metrics.num_cached_tokens
    return recorder.recording


def _run_to_end(engine: LLMEngine, request_id: str) -> None:
    while request_id in engine.requests:
        engine.step()


class _Recorder:
    def __init__(
        self,
        engine: LLMEngine,
        request: Request,
        settings: dict[str, str],
        num_channels: int,
        on_step: Callable[[StepRecord], None] | None,
    ) -> None:
        assert engine.kv_cache is not None and engine.kv_stores is not None
        self.engine = engine
        self.cache = engine.kv_cache
        self.stores = engine.kv_stores
        self.request = request
        self.on_step = on_step
        # (start, end, tables during the forward, tables after the window) of the last step
        self.pending: tuple[int, int, list[list[int]], list[list[int]]] | None = None
        config = engine.model_config
        specs = engine.kv_specs
        labels = [label for label, _, _ in engine.kv_group_usage()]
        groups = [
            GroupRecord(label, list(s.layer_ids), s.window, s.num_sinks, s.block_size)
            for label, s in zip(labels, specs, strict=True)
        ]
        self.shapes = [LayerGroupShape(s.num_layers, s.window, s.num_sinks) for s in specs]
        self.recording = Recording(
            model=engine.config.model,
            settings=settings,
            token_ids=[],
            token_texts=[],
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=0,
            groups=groups,
            kv_head=0,
            channels=list(range(min(num_channels, config.head_dim))),
            keys=[[] for _ in range(config.num_layers)],
            values=[[] for _ in range(config.num_layers)],
        )

    def wrap(self, update: Callable[[ScheduledBatch], None]) -> Callable[[ScheduledBatch], None]:
        def update_after_step(batch: ScheduledBatch) -> None:
            [num_new] = batch.num_new_tokens  # the engine runs this one request only
            start = self.request.num_computed_tokens
            written = self._tables()
            self._read_kv(start, start + num_new)
            update(batch)
            self.pending = (start, start + num_new, written, self._tables())

        return update_after_step

    def _tables(self) -> list[list[int]]:
        return [list(t) for t in self.cache.block_tables(self.request.request_id)]

    def _read_kv(self, start: int, end: int) -> None:
        """Append the K/V of positions [start, end) (head `kv_head`, the chosen channels) of
        every layer, read from the stores; reused positions before `start` get None."""
        rec = self.recording
        positions = torch.arange(start, end)
        channels = torch.tensor(rec.channels)
        for group, (spec, store) in enumerate(zip(self.engine.kv_specs, self.stores, strict=True)):
            table = torch.tensor(self.cache.block_tables(self.request.request_id)[group])
            block_ids = table[positions // spec.block_size]
            rows = block_ids * store.rows_per_block + positions % spec.block_size  # [N]
            rows = rows.to(store.data.device)
            for layer in spec.layer_ids:
                k, v = store.gather(layer, rows)  # [N, num_kv_heads, head_dim] each
                for out, x in ((rec.keys[layer], k), (rec.values[layer], v)):
                    out.extend([None] * (start - len(out)))
                    picked = x[:, rec.kv_head, :].float().cpu()[:, channels]  # [N, C]
                    out.extend(picked.tolist())

    def finish_step(self) -> None:
        """After `engine.step()`: note what the step computed, sampled and let go."""
        assert self.pending is not None, "the step did not run the recorded request"
        start, end, written, after = self.pending
        self.pending = None
        request = self.request
        reached_end = end >= request.num_prompt_tokens and len(request.token_ids) > end
        sampled = request.token_ids[end] if reached_end else None  # a prefill chunk samples none
        kind = "prefill" if start < request.num_prompt_tokens else "decode"
        without = recompute_work(self.shapes, end) if sampled is not None else NO_WORK
        step = StepRecord(
            kind=kind,
            start=start,
            end=end,
            sampled=sampled,
            tables_written=written,
            tables_after=after,
            with_cache=step_work(self.shapes, start, end),
            without_cache=without,
        )
        self.recording.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
