"""The paged attention kernel (kvlm/kernels/paged.py) against the torch reference.

Both read the same stored bytes, so in every format they agree to float32 rounding: the bound
is tight, and the simulated bugs below (a key off by one place, swapped blocks, sinks ignored)
fail it. Each SIMD path is held to the scalar reference.
"""

from __future__ import annotations

import pytest
import torch

from kvlm.kernels import available_paths
from kvlm.kernels.paged import paged_attention, quantize_kv
from kvlm.kv.quant import KVFormat, fp8_supported
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
    "mha": Heads(4, 4, 64),
    "gqa3": Heads(9, 3, 64),  # SmolLM2
    "mqa": Heads(4, 1, 256),  # Gemma 3 270M
    "hd96": Heads(6, 2, 96),  # int4 rotates by blocks of 32
}
SHAPES = {  # (cached tokens before the step, new tokens) per sequence
    "decode": ([37, 5, 70, 0], [1, 1, 1, 1]),
    "chunk": ([40], [23]),
    "mixed": ([0, 45, 13], [17, 1, 5]),
}
CACHES = {"plain": (None, 0), "window": (24, 0), "window+sinks": (24, 4)}
ATOL = 2e-5


def run_kernel(step: PagedStep, scale: float, softcap: float | None = None, path=None, **change):
    args = {
        "block_table": step.block_table,
        "query_start": step.query_start,
        "num_cached": step.num_cached,
        "sink_q": step.kernel_sink_query(),
        **change,
    }
    return paged_attention(step.kernel_query(), step.store, LAYER, scale=scale, softcap=softcap,
                           path=path, **args)  # fmt: skip


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("heads", list(HEADS), ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_equals_the_torch_reference(kv_format, heads, block_size, cache, shape) -> None:
    window, sinks = CACHES[cache]
    step = make_step(HEADS[heads], kv_format, block_size, window, sinks, *SHAPES[shape])
    scale = HEADS[heads].head_dim ** -0.5
    expected = reference(step, scale, None)
    got = run_kernel(step, scale)
    assert got.isfinite().all(), "a released (NaN) block was read"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kv_format", ["float32", "int8"])
def test_softcap_equals_the_reference(kv_format) -> None:
    step = make_step(HEADS["mqa"], kv_format, 16, 24, 4, *SHAPES["mixed"])
    expected = reference(step, 0.3, 5.0)  # scores up to ~5: the cap bends them
    torch.testing.assert_close(run_kernel(step, 0.3, 5.0), expected, atol=ATOL, rtol=1e-5)


def test_odd_lengths_and_long_windows() -> None:
    """Lengths that end mid-block and windows wider than blocks, in several tiles of keys."""
    step = make_step(HEADS["gqa3"], "int4", 16, 100, 4, [131, 1, 99], [3, 1, 33], seed=3)
    expected = reference(step, 0.125, None)
    torch.testing.assert_close(run_kernel(step, 0.125), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("cache", ["plain", "window+sinks"])
def test_head_dims_past_the_vector_width(kv_format, cache) -> None:
    """A head of 36 ends 4 columns past the AVX2 vectors and 4 past AVX-512's: the scalar tails
    of the scores and the weighted sum; a chunk of 23 queries in tiles of 5 with 3 query heads
    per kv head fills row blocks of 4 and one of 3."""
    step = make_step(Heads(9, 3, 36), kv_format, 16, *CACHES[cache], [40, 3], [23, 1])
    expected = reference(step, 0.2, None)
    for path in C_PATHS:
        torch.testing.assert_close(run_kernel(step, 0.2, path=path), expected, atol=ATOL,
                                   rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("kv_format", ["float32", "int4"])
@pytest.mark.parametrize("shape", ["decode", "chunk"])
def test_sinks_are_streaming_llm_far_past_a_models_context(kv_format, shape) -> None:
    """Keys stored roped by text position (3,000 and more, past SmolLM2's 2,048), no key roped
    in the kernel: each path and the torch reference answer as StreamingLLM's definition, keys
    and queries rotated by their places in the cache. Scoring the sinks against q at its text
    position instead is ~ws - ns = 2,977 places off, far outside the bound."""
    cached, counts = {"decode": ([3000, 40, 2], [1, 1, 1]), "chunk": ([2990], [30])}[shape]
    step = make_step(HEADS["gqa3"], kv_format, 16, 24, 4, cached, counts)
    got = reference(step, 0.125, None)  # writes this step's K/V
    expected = streaming_llm(step, 0.125)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for path in C_PATHS:
        got = run_kernel(step, 0.125, path=path)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert _far(run_kernel(step, 0.125, path=path, sink_q=step.kernel_query()), expected)


def run_with_threads(threads: int, step: PagedStep, scale: float, path=None) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_kernel(step, scale, path=path)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("path", C_PATHS)
@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 5, 8, 16, 32, 64])
@pytest.mark.parametrize("cache", list(CACHES))
def test_key_tiles_span_blocks(path, kv_format, block_size, cache) -> None:
    """Key tiles are 32 keys (kKeyTile) at every block size, so they start and end inside
    blocks and span several: lengths end mid-tile and mid-block, a 45-key window (wider than a
    tile) starts mid-block behind released (NaN) blocks, 5 sinks end mid-block; decode rows and
    a short chunk, then one long decode row whose keys are split over threads (parts start
    mid-tile)."""
    window, sinks = {"plain": (None, 0), "window": (45, 0), "window+sinks": (45, 5)}[cache]
    for cached, counts in (([0, 37, 70, 131], [1, 1, 7, 1]), ([301], [1])):
        step = make_step(HEADS["gqa3"], kv_format, block_size, window, sinks, cached, counts,
                         seed=block_size)  # fmt: skip
        expected = reference(step, 0.125, None)
        got = run_with_threads(2, step, 0.125, path=path)
        assert got.isfinite().all(), "a released (NaN) block was read"
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("kv_format", ["float16", "int8", "int4"])
@pytest.mark.parametrize("heads", ["gqa3", "mqa"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_one_sequence_splits_its_keys_over_threads(threads, kv_format, heads, cache) -> None:
    """A lone decode row of 700 keys has fewer (tile, kv head) items than threads: its keys are
    split in parts (across the sinks and the window too), merged into the same answer."""
    window, sinks = {"plain": (None, 0), "window": (300, 0), "window+sinks": (300, 4)}[cache]
    step = make_step(HEADS[heads], kv_format, 16, window, sinks, [700], [1])
    expected = reference(step, 0.125, None)
    torch.testing.assert_close(run_with_threads(threads, step, 0.125), expected, atol=ATOL,
                               rtol=1e-5)  # fmt: skip


def test_split_keys_of_a_chunk_and_a_decode_row() -> None:
    """Two sequences (a causal chunk, where late parts hold no key of the early queries, and a
    decode row) on 4 threads: parts of both tiles, merged per row."""
    step = make_step(HEADS["mqa"], "int8", 16, None, 0, [300, 500], [3, 1], seed=4)
    expected = reference(step, 0.1, None)
    torch.testing.assert_close(run_with_threads(4, step, 0.1), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("shape", ["decode", "chunk"])
def test_more_query_heads_than_rows_of_a_tile(shape) -> None:
    """32 query heads on one kv head: a tile takes 16 of them (kMaxRows), the rest another."""
    step = make_step(Heads(32, 1, 64), "float16", 16, None, 0, *SHAPES[shape])
    expected = reference(step, 0.125, None)
    torch.testing.assert_close(run_kernel(step, 0.125), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("path", [p for p in C_PATHS if p != "ref"])
@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("heads", ["gqa3", "mqa", "hd96"])
def test_simd_paths_equal_the_scalar_kernel(path, kv_format, heads) -> None:
    step = make_step(HEADS[heads], kv_format, 16, 24, 4, *SHAPES["mixed"], seed=1)
    reference(step, 0.1, None)  # writes this step's K/V
    plain = make_step(HEADS[heads], kv_format, 32, None, 0, *SHAPES["mixed"], seed=2)
    reference(plain, 0.1, None)
    for s in (step, plain):
        torch.testing.assert_close(run_kernel(s, 0.1, path=path), run_kernel(s, 0.1, path="ref"),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


# --- the comparison has teeth: simulated bugs fail it --------------------------------------


def _far(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_a_key_off_by_one_place_fails() -> None:
    step = make_step(HEADS["gqa3"], "int8", 16, None, 0, [37, 5, 70], [1, 1, 1])
    expected = reference(step, 0.125, None)
    assert _far(run_kernel(step, 0.125, num_cached=step.num_cached - 1), expected)


def test_swapped_blocks_fail() -> None:
    step = make_step(HEADS["mha"], "float16", 16, None, 0, [70], [1])
    expected = reference(step, 0.125, None)
    table = step.block_table.clone()
    table[0, [0, 4]] = table[0, [4, 0]]  # the partial last block for a full one
    assert _far(run_kernel(step, 0.125, block_table=table), expected)


def test_ignoring_the_sinks_fails() -> None:
    step = make_step(HEADS["mqa"], "float32", 16, 24, 4, [60], [1])
    expected = reference(step, 0.2, None)
    no_sinks = make_step(HEADS["mqa"], "float32", 16, 24, 0, [60], [1])  # same seed, same data
    reference(no_sinks, 0.2, None)
    assert _far(run_kernel(no_sinks, 0.2), expected)


# --- inputs it refuses ----------------------------------------------------------------------


def test_refuses_bad_inputs() -> None:
    step = make_step(HEADS["gqa3"], "int8", 16, 24, 4, *SHAPES["mixed"])
    reference(step, 0.1, None)
    table = step.block_table.clone()
    table[1, 0] = step.store.num_blocks
    with pytest.raises(ValueError, match="outside the store"):
        run_kernel(step, 0.1, block_table=table)
    with pytest.raises(ValueError, match="rise from 0 to T"):
        run_kernel(step, 0.1, query_start=step.query_start + 1)
    max_blocks = step.block_table.shape[1]
    with pytest.raises(ValueError, match=f"past {max_blocks} blocks of 16"):
        run_kernel(step, 0.1, num_cached=step.num_cached + 16 * max_blocks)
    with pytest.raises(ValueError, match="query_start"):
        run_kernel(step, 0.1, num_cached=step.num_cached[:2])
    with pytest.raises(ValueError, match="needs `sink_q`"):
        paged_attention(step.q, step.store, LAYER, step.block_table, step.query_start,
                        step.num_cached, 0.1)  # fmt: skip


# --- the quantizer the decode plan writes with ----------------------------------------------


@pytest.mark.parametrize("kv_format", ["int8", "int4", *(["fp8"] if fp8_supported() else [])])
@pytest.mark.parametrize("head_dim", [64, 96, 256])
def test_quantize_kv_matches_kvformat(kv_format, head_dim) -> None:
    x = torch.randn(512, head_dim) * torch.logspace(-3, 1, 512)[:, None]
    x[0] = 0.0  # the scale floor
    data, scales = quantize_kv(x, kv_format)
    fmt = KVFormat(kv_format, head_dim)
    want_data, want_scales = fmt.quantize(x)
    if kv_format != "int4":  # bit for bit
        assert torch.equal(data, want_data) and torch.equal(scales, want_scales)
        return
    # int4: the rotation's float sums may round a value on a tie the other way, no more
    same = (data == want_data).float().mean().item()
    assert same > 0.995, same
    back = fmt.dequantize(data, scales, torch.float32)
    want = fmt.dequantize(want_data, want_scales, torch.float32)
    step = want_scales.float().amax(-1, keepdim=True)
    assert ((back - want).abs() <= 1.01 * step).all()
