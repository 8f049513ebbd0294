"""Record one generation step by step: which tokens each step computed, the block tables, and
real K/V values read back from the cache, plus the work the cache saved.

The recorder is an engine observer, registered only while recording: it reads K/V in
`on_forward` (the forward pass has written them, no window has let their blocks go yet) and
notes the step in `on_step`. Nothing is added to the engine's code path when not visualizing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvlm.engine.engine import LLMEngine
from kvlm.engine.observers import BlockTables, EngineObserver, ForwardEvent, StepEvent
from kvlm.engine.request import Request
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
    engine.add_observer(recorder)
    try:
        while request_id in engine.requests:
            engine.step()
            assert recorder.ran, "the step did not run the recorded request"
            recorder.ran = False
    finally:
        engine.remove_observer(recorder)
    recorder.recording.token_ids = list(request.token_ids)
    recorder.recording.token_texts = [
        engine.tokenizer.decode([t], skip_special_tokens=False) for t in request.token_ids
    ]
    recorder.recording.num_cached_tokens = request.metrics.num_cached_tokens
    return recorder.recording


def _run_to_end(engine: LLMEngine, request_id: str) -> None:
    while request_id in engine.requests:
        engine.step()


class _Recorder(EngineObserver):
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
        self.stores = engine.kv_stores
        self.request = request
        self.step_callback = on_step
        self.ran = False  # the last step ran the request
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

    def on_forward(self, event: ForwardEvent) -> None:
        [scheduled] = event.scheduled  # the engine runs this one request only
        assert scheduled.request is self.request
        [tables] = event.tables
        self._read_kv(tables, scheduled.start, scheduled.end)

    def _read_kv(self, tables: BlockTables, start: int, end: int) -> None:
        """Append the K/V of positions [start, end) (head `kv_head`, the chosen channels) of
        every layer, read from the stores; reused positions before `start` get None."""
        rec = self.recording
        positions = torch.arange(start, end)
        channels = torch.tensor(rec.channels)
        for group, (spec, store) in enumerate(zip(self.engine.kv_specs, self.stores, strict=True)):
            table = torch.tensor(tables[group])
            block_ids = table[positions // spec.block_size]
            rows = block_ids * store.rows_per_block + positions % spec.block_size  # [N]
            rows = rows.to(store.data.device)
            for layer in spec.layer_ids:
                k, v = store.gather(layer, rows)  # [N, num_kv_heads, head_dim] each
                for out, x in ((rec.keys[layer], k), (rec.values[layer], v)):
                    out.extend([None] * (start - len(out)))
                    picked = x[:, rec.kv_head, :].float().cpu()[:, channels]  # [N, C]
                    out.extend(picked.tolist())

    def on_step(self, event: StepEvent) -> None:
        """Note what the step computed, sampled and let go."""
        [scheduled] = event.scheduled
        start, end = scheduled.start, scheduled.end
        [written], [after] = event.tables_written, event.tables_after
        self.ran = True
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
            tables_written=[list(t) for t in written],
            tables_after=[list(t) for t in after],
            with_cache=step_work(self.shapes, start, end),
            without_cache=without,
        )
        self.recording.steps.append(step)
        if self.step_callback is not None:
            self.step_callback(step)
