"""The paged prefill kernel (csrc/paged_prefill.h, `paged_attention(..., prefill=True)`) against
the torch reference.

It reads the same stored bytes as the reference, so in every format the two agree to float32
rounding. The shapes span several query tiles (64 tokens) and key tiles (64 keys), windows
that skip whole key tiles, sinks, history before the chunk, released (NaN) blocks, and mixed
steps where decode rows sit beside long chunks.
"""

from __future__ import annotations

import pytest
import torch

from kvlm.kernels import available_paths
from kvlm.kernels.paged import PREFILL_MIN_QUERY_LEN, paged_attention
from kvlm.kv.quant import fp8_supported
from tests.kernels.paged_steps import (
    LAYER,
    Heads,
    PagedStep,
    make_step,
    reference,
    streaming_llm,
)

C_PATHS = [p for p in ("ref", "avx2", "avx512") if p in available_paths()]
pytestmark = pytest.mark.skipif(not C_PATHS, reason="the C++ kernels did not build")
FORMATS = [
    "float32",
    "float16",
    "bfloat16",
    "int8",
    "int4",
    pytest.param("fp8", marks=pytest.mark.skipif(not fp8_supported(), reason="no fp8 here")),
]
HEADS = {
    "gqa3": Heads(9, 3, 64),  # SmolLM2
    "mqa": Heads(4, 1, 256),  # Gemma 3 270M
    "hd96": Heads(6, 2, 96),  # int4 rotates by blocks of 32
    "hd36": Heads(4, 2, 36),  # past the vector widths: padded value columns
}
SHAPES = {  # (cached tokens before the step, new tokens) per sequence
    "history": ([77], [130]),  # a chunk after earlier chunks, key tiles across the history
    "mixed": ([0, 45, 13, 70], [131, 1, 5, 66]),  # a prompt of 3 query tiles, decode rows
}
# windows narrower than a query tile and wider (with sinks before them)
CACHES = {"plain": (None, 0), "window": (40, 0), "wide+sinks": (100, 4)}
ATOL = 2e-5


def run_prefill(step: PagedStep, scale: float, softcap: float | None = None, path=None,
                prefill: bool | None = True, **change) -> torch.Tensor:  # fmt: skip
    args = {
        "block_table": step.block_table,
        "query_start": step.query_start,
        "num_cached": step.num_cached,
        "sink_q": step.kernel_sink_query(),
        **change,
    }
    return paged_attention(step.kernel_query(), step.store, LAYER, scale=scale, softcap=softcap,
                           path=path, prefill=prefill, **args)  # fmt: skip


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("heads", ["gqa3", "mqa", "hd96"])
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefill_equals_the_torch_reference(kv_format, heads, cache, shape) -> None:
    window, sinks = CACHES[cache]
    block_size = 32 if shape == "history" else 16
    step = make_step(HEADS[heads], kv_format, block_size, window, sinks, *SHAPES[shape])
    scale = HEADS[heads].head_dim ** -0.5
    expected = reference(step, scale, None)
    got = run_prefill(step, scale)
    assert got.isfinite().all(), "a released (NaN) block was read"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("path", C_PATHS)
@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("heads", ["gqa3", "hd36"])
def test_every_path_equals_the_reference(path, kv_format, heads) -> None:
    """Each ISA's vectors (scalar, AVX2, AVX-512) on a window with sinks and odd lengths."""
    step = make_step(HEADS[heads], kv_format, 16, 40, 4, [13, 0], [99, 67], seed=1)
    expected = reference(step, 0.1, None)
    torch.testing.assert_close(run_prefill(step, 0.1, path=path), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("path", C_PATHS)
@pytest.mark.parametrize("kv_format", ["float16", "int8", "int4"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 5, 8, 64])
def test_key_tiles_span_blocks(path, kv_format, block_size) -> None:
    """A key tile (64 keys) looks every key's row up in the block table, so it spans blocks of
    any size: lengths end mid-block, the 40-key window starts mid-block behind released (NaN)
    blocks, the 5 sinks end mid-block."""
    step = make_step(HEADS["gqa3"], kv_format, block_size, 40, 5, [77, 0], [130, 67],
                     seed=block_size)  # fmt: skip
    expected = reference(step, 0.125, None)
    got = run_prefill(step, 0.125, path=path)
    assert got.isfinite().all(), "a released (NaN) block was read"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kv_format", ["float32", "int8"])
def test_softcap_equals_the_reference(kv_format) -> None:
    step = make_step(HEADS["mqa"], kv_format, 16, 40, 4, *SHAPES["mixed"])
    expected = reference(step, 0.3, 5.0)  # scores up to ~5: the cap bends them
    torch.testing.assert_close(run_prefill(step, 0.3, 5.0), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_give_the_same_answer(threads) -> None:
    """Items are taken from a shared counter, the most work first: any order, same answer."""
    step = make_step(HEADS["gqa3"], "int4", 16, None, 0, [10, 0], [200, 70], seed=2)
    expected = reference(step, 0.125, None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_prefill(step, 0.125)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def test_long_chunks_take_the_prefill_kernel() -> None:
    """prefill=None picks the prefill kernel iff a chunk has over PREFILL_MIN_QUERY_LEN
    queries; the two kernels round differently, so the bits tell which one ran."""
    for count, want in ((PREFILL_MIN_QUERY_LEN, False), (PREFILL_MIN_QUERY_LEN + 1, True)):
        step = make_step(HEADS["gqa3"], "float32", 16, None, 0, [0, 9], [count, 1], seed=4)
        reference(step, 0.125, None)  # writes this step's K/V
        chosen = run_prefill(step, 0.125, prefill=None)
        prefill, paged = run_prefill(step, 0.125), run_prefill(step, 0.125, prefill=False)
        assert not torch.equal(prefill, paged)
        assert torch.equal(chosen, prefill if want else paged)


# --- the comparison has teeth: simulated bugs fail it --------------------------------------


def _far(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_a_key_off_by_one_place_fails() -> None:
    step = make_step(HEADS["gqa3"], "int8", 16, None, 0, [37, 5], [100, 70])
    expected = reference(step, 0.125, None)
    assert _far(run_prefill(step, 0.125, num_cached=step.num_cached + 1), expected)


def test_swapped_blocks_fail() -> None:
    step = make_step(HEADS["mqa"], "float16", 16, None, 0, [30], [100])
    expected = reference(step, 0.125, None)
    table = step.block_table.clone()
    table[0, [0, 4]] = table[0, [4, 0]]
    assert _far(run_prefill(step, 0.125, block_table=table), expected)


@pytest.mark.parametrize("kv_format", ["float32", "int4"])
def test_sinks_are_streaming_llm_far_past_a_models_context(kv_format) -> None:
    """A 200-token chunk after 2,990 tokens (window 100 + 4 sinks), keys stored roped by text
    position, no key roped in the kernel: every path answers as StreamingLLM's definition (keys
    and queries by place in the cache); the sinks scored against q at its text position fail."""
    step = make_step(HEADS["gqa3"], kv_format, 16, 100, 4, [2990, 5], [200, 1])
    reference(step, 0.125, None)  # writes this step's K/V
    expected = streaming_llm(step, 0.125)
    for path in C_PATHS:
        torch.testing.assert_close(run_prefill(step, 0.125, path=path), expected, atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
        assert _far(run_prefill(step, 0.125, path=path, sink_q=step.kernel_query()), expected)


def test_ignoring_the_sinks_fails() -> None:
    step = make_step(HEADS["mqa"], "float32", 16, 40, 4, [60], [100])
    expected = reference(step, 0.2, None)
    no_sinks = make_step(HEADS["mqa"], "float32", 16, 40, 0, [60], [100])  # same seed, data
    reference(no_sinks, 0.2, None)
    assert _far(run_prefill(no_sinks, 0.2), expected)
