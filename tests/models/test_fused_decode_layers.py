"""Each decoder layer of the fused path against the torch layer it replaces, in every step:
decode rows, prompt chunks (the decode kernel for short ones, the prefill kernel past
PREFILL_MIN_QUERY_LEN), mixed steps and speculative verification chunks.

The quantized path quantizes every matmul input to int8 blocks, so a float difference of 1e-7
(the C++ rms_norm sums in another order than torch's) can flip an int8 rounding: a layer's fused
output then moves by up to ~3e-2 relative from the torch layer's, and whole-model outputs drift
apart after some tokens. So the comparison is one layer at a time, on identical inputs (the
torch layer's own input and cache) at every step, through a one-layer plan, with a
criterion rounding flips pass and bugs fail (see CLOSE). In a step with several tokens per
sequence a flip in one token's K/V moves every later token of its chunk (they read it in the
same step), so chunk steps' outputs are held to MAX_DIFFERENCE only; their K/V rows (each a
function of its own token) to the full criterion, and `test_chunks_equal_tokens_one_by_one`
holds a chunk to its tokens decoded one at a time by the same plan, where no flip can differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from kvlm import LLM, KVPress, SamplingParams
from kvlm.attention.context import ForwardContext
from kvlm.bench.haystack import reference_text
from kvlm.engine.runner import ModelRunner
from kvlm.kernels.paged import FORMAT_CODES, PREFILL_MIN_QUERY_LEN
from kvlm.kv.store import KVStore
from kvlm.models.transformer import DecoderLayer
from tests.models.conftest import PROMPTS, SIMD_PATHS, greedy, needs_simd, one_layer_plan, unit_norm

pytestmark = needs_simd

# How far one layer's fused output may be from the torch layer's, relative (per sequence, max
# |fused - torch| / max |torch|). Most steps agree to float precision (~1e-7); an int8 rounding
# flip moves a step by up to 2.7e-2 (Gemma 3's layer 0 moves as much when the torch path's
# own input is perturbed by 1e-7), but flips are rare: at most 8% of any layer's (step,
# sequence) pairs exceed 1e-3, measured over 60 steps of 3 prompts on both models, with a
# 16-token window, a bfloat16 cache and 505-token prompts. A bug moves every step: with the
# rope one position off, the oldest or newest key left out, or K/V written to a wrong row,
# every layer has over 22% of its pairs above 1e-3 and some layer 100%.
CLOSE = 1e-3
MAX_FRACTION_NOT_CLOSE = 0.3
MAX_DIFFERENCE = 0.1  # any single pair (a NaN fails too)


@dataclass
class LayerComparison:
    """What `compare_layers` saw over the steps of one run."""

    # layer -> relative differences, one per (step, new token): of the output in decode steps
    # and in the other steps, and of the K/V rows the plan wrote
    outputs: dict[int, list[float]] = field(default_factory=dict)
    chunk_outputs: dict[int, list[float]] = field(default_factory=dict)
    kv_rows: dict[int, list[float]] = field(default_factory=dict)
    num_steps: int = 0  # decode steps compared (every layer in each)
    chunk_lens: list[int] = field(default_factory=list)  # longest chunk of each other step
    max_dropped_keys: int = 0  # most keys a window or press kept out of one sequence's attention
    shared_rows: bool = False  # two sequences of one step read the same cache row


def _relative(got: torch.Tensor, expected: torch.Tensor) -> list[float]:
    """Per row (sequence): max |got - expected| / max |expected|."""
    diff = (got - expected).abs().flatten(1).amax(1)
    return (diff / expected.abs().flatten(1).amax(1)).tolist()


@contextmanager
def compare_layers(
    runner: ModelRunner, path: str | None = None, position_shift: int = 0
) -> Iterator[LayerComparison]:
    """Runs the runner's model on the torch path; in each decode step, just before a layer runs, a
    one-layer plan computes the same layer from the same input x and cache, and just after,
    its output is compared with rms_norm(layer output) and its K/V rows with the torch
    layer's. The plan's own writes are undone before the torch layer runs, so the cache stays
    the torch path's. The plan gets the step's text positions (rope) and the views' num_cached
    (cache positions, fewer after a KV press); `position_shift` hands it wrong text positions
    (to show a bug fails)."""
    model = runner.model
    report = LayerComparison()
    plans = [one_layer_plan(model, layer, path) for layer in model.layers]
    unit = unit_norm(model)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def before(layer: DecoderLayer, args: tuple) -> None:
        x, _, ctx = args
        idx = layer.attn.layer_idx
        view = ctx.layer_views[idx]
        store = view.store
        k_off, v_off = store.layer_offsets(idx)
        rows = torch.stack([view.write_rows + k_off, view.write_rows + v_off], 1)  # [T, 2]
        saved = [t[rows].clone() for t in _store_tensors(store)]
        plan = plans[idx].plan
        plan.set_layout([0], [k_off], [v_off])
        spec = store.spec
        plan.set_groups([FORMAT_CODES[spec.kv_format]], [spec.block_size],
                        [store.rows_per_block], [spec.window or 0], [spec.num_sinks])  # fmt: skip
        positions = ctx.positions + position_shift
        scales = torch.empty(0, dtype=torch.float16) if store.scales is None else store.scales
        out = plan.forward(
            x,
            positions,
            view.query_start,
            [view.num_cached],
            [store.data],
            [scales],
            [view.write_rows],
            [view.block_table],
            ctx.max_query_len > PREFILL_MIN_QUERY_LEN,
        )
        pending[idx] = (out, _kv_rows(store, rows), rows)
        for t, before_plan in zip(_store_tensors(store), saved, strict=True):
            t[rows] = before_plan
        if idx == 0 and ctx.max_query_len == 1:
            _note_keys(report, ctx)
        elif idx == 0:
            report.chunk_lens.append(ctx.max_query_len)

    def after(layer: DecoderLayer, args: tuple, output: torch.Tensor) -> None:
        idx = layer.attn.layer_idx
        if idx not in pending:
            return
        out, plan_kv, rows = pending.pop(idx)
        outputs = report.outputs if args[2].max_query_len == 1 else report.chunk_outputs
        outputs.setdefault(idx, []).extend(_relative(out, unit(output)))
        torch_kv = _kv_rows(args[2].layer_views[idx].store, rows)
        report.kv_rows.setdefault(idx, []).extend(_relative(plan_kv, torch_kv))

    # The torch path with its reference attention (gather + SDPA), whose gather index and key
    # counts `_note_keys` reads; the paged kernel builds neither.
    fused, runner.fused = runner.fused, None
    paged, runner.paged_attention = runner.paged_attention, None
    handles = []
    for layer in model.layers:
        handles.append(layer.register_forward_pre_hook(before))
        handles.append(layer.register_forward_hook(after))
    try:
        yield report
    finally:
        for handle in handles:
            handle.remove()
        runner.fused = fused
        runner.paged_attention = paged


def _store_tensors(store: KVStore) -> list[torch.Tensor]:
    return [store.data] if store.scales is None else [store.data, store.scales]


def _kv_rows(store: KVStore, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the store, dequantized: [T, 2, nkv, hd] float32."""
    scales = None if store.scales is None else store.scales[rows]
    return store.format.dequantize(store.data[rows], scales, torch.float32)


def _note_keys(report: LayerComparison, ctx: ForwardContext) -> None:
    report.num_steps += 1
    for view in {id(v): v for v in ctx.layer_views}.values():
        dropped = ctx.positions + 1 - view.key_counts  # [B] keys before the window
        report.max_dropped_keys = max(report.max_dropped_keys, int(dropped.max()))
        gather = view.gather_index.view(ctx.num_seqs, view.num_keys)
        seen = [set(gather[b, : int(view.key_counts[b])].tolist()) for b in range(ctx.num_seqs)]
        report.shared_rows |= any(seen[a] & seen[b] for b in range(len(seen)) for a in range(b))


def _mismatches(differences: dict[int, list[float]]) -> list[str]:
    """Layers whose differences look like a bug rather than int8 rounding flips."""
    found = []
    for layer, values in sorted(differences.items()):
        diff = np.array(values)
        not_close = float((~(diff <= CLOSE)).mean())
        if not_close > MAX_FRACTION_NOT_CLOSE or not (diff <= MAX_DIFFERENCE).all():
            found.append(f"layer {layer}: {not_close:.0%} of steps off by > {CLOSE}, "
                         f"worst {diff.max():.2e}")  # fmt: skip
    return found


def _assert_layers_match(report: LayerComparison, num_layers: int, num_steps: int) -> None:
    assert report.num_steps == num_steps, "every decode step should have been compared"
    assert sorted(report.outputs) == list(range(num_layers))
    assert _mismatches(report.outputs) == [], "fused layer outputs differ from the torch layers"
    assert _mismatches(report.kv_rows) == [], "fused K/V rows differ from the torch layers'"
    for layer, values in report.chunk_outputs.items():
        assert (np.array(values) <= MAX_DIFFERENCE).all(), f"layer {layer} in a chunk step"


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_each_layer_matches_torch_smollm2(smollm2_gguf: LLM, path: str) -> None:
    model = smollm2_gguf.engine.model
    with compare_layers(smollm2_gguf.engine.runner, path) as report:
        smollm2_gguf.generate(PROMPTS, greedy(25))
    _assert_layers_match(report, model.config.num_layers, 24)


def test_each_layer_matches_torch_gemma3(gemma3_gguf: LLM) -> None:
    """qk-norm, sandwich norms, GELU, a local and a global rope, two cache groups."""
    model = gemma3_gguf.engine.model
    with compare_layers(gemma3_gguf.engine.runner) as report:
        gemma3_gguf.generate(PROMPTS, greedy(25))
    _assert_layers_match(report, model.config.num_layers, 24)


def test_gemma3_window_of_512_drops_keys(gemma3_gguf: LLM) -> None:
    """A 505-token prompt beside short ones: the sliding layers' window leaves keys out after
    a few steps while the global layers read everything."""
    long_ids = gemma3_gguf.tokenizer.encode(reference_text())[:505]
    prompts = [{"prompt_token_ids": long_ids}, *PROMPTS[:2]]
    model = gemma3_gguf.engine.model
    with compare_layers(gemma3_gguf.engine.runner) as report:
        gemma3_gguf.generate(prompts, greedy(25))
    assert report.max_dropped_keys == 505 + 24 - 512
    _assert_layers_match(report, model.config.num_layers, 24)


@pytest.mark.parametrize("num_sinks", [0, 4])
def test_engine_window_drops_keys(num_sinks: int) -> None:
    """With sinks, keys are stored roped by text position and the sink keys see q at its place
    in the cache."""
    llm = LLM("smollm2", weight_format="gguf", sliding_window=16, attention_sinks=num_sinks)
    model = llm.engine.model
    with compare_layers(llm.engine.runner) as report:
        llm.generate(PROMPTS, greedy(25))
    assert report.max_dropped_keys == 13 + 24 - 16 - num_sinks  # sinks are kept
    _assert_layers_match(report, model.config.num_layers, 24)


def test_pressed_cache(smollm2_gguf: LLM) -> None:
    """A request a KV press compacted, beside a plain one: its cache positions are its text
    positions less the 150 dropped tokens. The plan ropes by text position and reads the 50
    kept keys (cache rows 0 .. 49, roped by their text places) and the new ones, as the torch
    layers do on the same compacted cache."""
    prompt = smollm2_gguf.tokenizer.encode(reference_text())[:200]
    press = KVPress("knorm", 0.75)
    pressed = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True, kv_press=press)
    model = smollm2_gguf.engine.model
    with compare_layers(smollm2_gguf.engine.runner) as report:
        outputs = smollm2_gguf.generate(
            [{"prompt_token_ids": prompt}, PROMPTS[0]], [pressed, greedy(25)]
        )
    assert outputs[0].metrics.kv_pressed_bytes is not None
    assert outputs[1].metrics.kv_pressed_bytes is None
    assert report.max_dropped_keys == 200 - press.num_kept(200) == 150
    _assert_layers_match(report, model.config.num_layers, 24)


def test_shared_prefix_blocks(smollm2_gguf: LLM) -> None:
    """Sequences whose first blocks come from the prefix cache read the same rows."""
    prefix = "The quick brown fox jumps over the lazy dog. " * 6  # 61 tokens: 3 full blocks
    smollm2_gguf.generate([prefix], greedy(1))
    model = smollm2_gguf.engine.model
    with compare_layers(smollm2_gguf.engine.runner) as report:
        outputs = smollm2_gguf.generate([prefix + e for e in ("It", "Then", "A cat")], greedy(25))
    assert all(out.metrics.num_cached_tokens >= 32 for out in outputs)
    assert report.shared_rows
    _assert_layers_match(report, model.config.num_layers, 24)


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16", "int8", "int4", "fp8"])
def test_each_cache_format(kv_cache_dtype: str) -> None:
    """The plan writes K/V in the store's format (quantized as KVStore.write) and reads it
    through the block tables."""
    llm = LLM("smollm2", weight_format="gguf", kv_cache_dtype=kv_cache_dtype)
    model = llm.engine.model
    with compare_layers(llm.engine.runner) as report:
        llm.generate(PROMPTS, greedy(25))
    assert {s.format.name for s in llm.engine.kv_stores} == {kv_cache_dtype}
    _assert_layers_match(report, model.config.num_layers, 24)


def test_int4_cache_with_sinks_gemma3() -> None:
    """int4's rotation undone per key before rope by place in the cache, on an MQA model."""
    llm = LLM("gemma3-270m", weight_format="gguf", kv_cache_dtype="int4", sliding_window=16,
              attention_sinks=4)  # fmt: skip
    model = llm.engine.model
    with compare_layers(llm.engine.runner) as report:
        llm.generate(PROMPTS, greedy(25))
    _assert_layers_match(report, model.config.num_layers, 24)


def test_batch_grows_and_shrinks(smollm2_gguf: LLM) -> None:
    """Plans that decode one sequence, then three with longer key lists, then fewer as they
    finish: buffers sized for the first steps grow and every step stays right."""
    engine, tokenizer = smollm2_gguf.engine, smollm2_gguf.tokenizer
    model = engine.model
    with compare_layers(engine.runner) as report:
        engine.add_request(None, tokenizer.encode(PROMPTS[2]), greedy(30))  # 1 token
        for _ in range(6):  # its 1-token prefill and 5 decode steps, one sequence each
            engine.step()
        for prompt, max_tokens in zip(PROMPTS[:2], (10, 20), strict=True):
            engine.add_request(None, tokenizer.encode(prompt), greedy(max_tokens))
        while engine.has_unfinished():  # a mixed step, then decode steps of 3, 2, 1 sequences
            engine.step()
    _assert_layers_match(report, model.config.num_layers, 6 + 23)


def test_prompt_chunks_beside_decode_rows(smollm2_gguf: LLM) -> None:
    """Prompts of 1-13 tokens in one chunk step (the decode kernel), a 300-token prompt in one
    (the prefill kernel, past PREFILL_MIN_QUERY_LEN), then a prompt joining two decoding
    sequences: every layer of every step as the torch layers compute it."""
    engine, tokenizer = smollm2_gguf.engine, smollm2_gguf.tokenizer
    long_ids = tokenizer.encode(reference_text())[2000:2300]  # no other test's prefix
    model = engine.model
    with compare_layers(engine.runner) as report:
        for prompt in PROMPTS[:2]:
            engine.add_request(None, tokenizer.encode(prompt), greedy(12))
        engine.step()  # both prompts, one chunk each
        engine.step()  # a decode step of both
        engine.add_request(None, long_ids, greedy(4))
        while engine.has_unfinished():
            engine.step()
    assert report.chunk_lens[0] == max(len(tokenizer.encode(p)) for p in PROMPTS[:2])
    assert report.chunk_lens[1] == 300 > PREFILL_MIN_QUERY_LEN  # beside two decode rows
    _assert_layers_match(report, model.config.num_layers, 10)


@pytest.mark.parametrize("num_sinks", [0, 4])
def test_speculative_verification_chunks(num_sinks: int) -> None:
    """n-gram drafts verified in one step: each draft token reads its sequence's cache and the
    drafts before it (with a window and sinks too)."""
    window = {"sliding_window": 32, "attention_sinks": num_sinks} if num_sinks else {}
    speculative = {"method": "ngram", "num_tokens": 4}
    llm = LLM("smollm2", weight_format="gguf", speculative=speculative, **window)
    with compare_layers(llm.engine.runner) as report:
        llm.generate(["a b c d e f g h i j " * 4, PROMPTS[0]], greedy(20))
    assert max(report.chunk_lens[1:]) >= 2  # steps that verified drafts
    assert report.num_steps > 0 and report.outputs
    assert _mismatches(report.outputs) == [] and _mismatches(report.kv_rows) == []


def test_comparison_catches_a_wrong_rope(smollm2_gguf: LLM) -> None:
    """The tolerance is not too loose: the plan fed text positions one ahead fails it (its
    cache positions stay right, so the rope alone is off; one back would put a cache
    position past its text position, an error of its own)."""
    with compare_layers(smollm2_gguf.engine.runner, position_shift=1) as report:
        smollm2_gguf.generate(PROMPTS, greedy(9))
    assert _mismatches(report.outputs) != []
