"""The Triton paged attention (kvlm/kernels/triton_paged.py) against the torch reference.

Without CUDA the kernel runs in triton's interpreter on the CPU (TRITON_INTERPRET=1, which
`triton.jit` reads when a kernel is defined, triton.language's own at `import triton`: so it is
set here before triton is imported, and this module refuses to run if that was too late); with
CUDA it runs compiled on the GPU, the store copied there after the reference wrote this step's
K/V. Both read the same stored bytes as the reference, so the bound is float32 rounding, and
the simulated bugs at the end fail it. The interpreter is slow: the grid covers every format
with every cache kind, and every head layout with every block size and step shape, not the
whole product.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (it is in the `test` extra)")

from kvlm.kernels import triton_paged  # noqa: E402
from tests.kernels.paged_steps import (  # noqa: E402
    LAYER,
    Heads,
    PagedStep,
    make_step,
    reference,
    streaming_llm,
)

if DEVICE.type == "cpu" and not triton_paged.interpreted():
    raise RuntimeError(
        "triton was imported in this process before TRITON_INTERPRET=1 was set, so its kernels "
        "are compiled for a GPU this machine lacks: run this file on its own, or with "
        "TRITON_INTERPRET=1 in the environment"
    )

FORMATS = ["float32", "float16", "bfloat16", "int8", "int4", "fp8"]
HEADS = {
    "gqa3": Heads(9, 3, 64),  # SmolLM2's 9 query heads over 3 KV heads
    "mqa": Heads(4, 1, 32),
    "mha": Heads(8, 8, 32),
}
SHAPES = {  # (cached tokens before the step, new tokens) per sequence
    "decode": ([37, 5, 70, 0], [1, 1, 1, 1]),
    "chunk": ([40], [23]),
    "mixed": ([0, 45, 13], [17, 1, 5]),
}
CACHES = {"plain": (None, 0), "window": (24, 0), "window+sinks": (24, 4)}
ATOL = 2e-5


def run_kernel(step: PagedStep, scale: float, softcap: float | None = None, **change):
    """The kernel on DEVICE; call after `reference`, which writes this step's K/V."""
    store = step.store
    if DEVICE.type != "cpu":
        store = copy.copy(store)
        store.data = store.data.to(DEVICE)
        store.scales = None if store.scales is None else store.scales.to(DEVICE)
    args = {
        "q": step.kernel_query().to(DEVICE),
        "block_table": step.block_table,
        "query_start": step.query_start,
        "num_cached": step.num_cached,
        **change,
    }
    sink_q = step.kernel_sink_query()
    if "sink_q" not in change and sink_q is not None:  # in q's dtype
        args["sink_q"] = sink_q.to(DEVICE, args["q"].dtype)
    out = triton_paged.paged_attention(store=store, layer_idx=LAYER, scale=scale,
                                       softcap=softcap, **args)  # fmt: skip
    return out.cpu()


def check(heads: Heads, kv_format: str, block_size: int, cache: str, cached, counts) -> None:
    window, sinks = CACHES[cache]
    step = make_step(heads, kv_format, block_size, window, sinks, cached, counts)
    scale = heads.head_dim**-0.5
    expected = reference(step, scale, None)
    got = run_kernel(step, scale)
    assert got.isfinite().all(), "a released (NaN) block was read"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("kv_format", FORMATS)
def test_every_format_with_every_cache(kv_format, cache) -> None:
    check(HEADS["gqa3"], kv_format, 16, cache, *SHAPES["mixed"])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", list(HEADS))
def test_every_head_layout_block_size_and_step_shape(heads, block_size, shape) -> None:
    # The format varies along the cases, so each also meets several formats.
    case = list(HEADS).index(heads) * 6 + [16, 32].index(block_size) * 3 + list(SHAPES).index(shape)
    kv_format = FORMATS[case % len(FORMATS)]
    check(HEADS[heads], kv_format, block_size, "window+sinks", *SHAPES[shape])


@pytest.mark.parametrize("cache", ["plain", "window+sinks"])
def test_int4_rotates_by_blocks_of_32_when_head_dim_is_no_power_of_two(cache) -> None:
    check(Heads(6, 2, 96), "int4", 16, cache, *SHAPES["mixed"])


def test_wide_heads_take_narrower_key_tiles() -> None:
    """Gemma 3's 256-wide heads: 16 keys a tile, int4 rotated by the whole head, sinks."""
    check(Heads(4, 1, 256), "int4", 16, "window+sinks", *SHAPES["mixed"])


def test_odd_lengths_and_long_windows() -> None:
    """Lengths that end mid-block, a window wider than blocks, several key tiles per query."""
    step = make_step(HEADS["gqa3"], "int4", 16, 100, 4, [131, 1, 99], [3, 1, 33], seed=3)
    expected = reference(step, 0.125, None)
    got = run_kernel(step, 0.125, block_table=step.block_table.int())  # the runner's int32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(("kv_format", "cache"), [("float32", "plain"), ("fp8", "window+sinks")])
def test_softcap_equals_the_reference(kv_format, cache) -> None:
    window, sinks = CACHES[cache]
    step = make_step(HEADS["mqa"], kv_format, 16, window, sinks, *SHAPES["mixed"])
    expected = reference(step, 0.3, 5.0)  # scores up to ~5: the cap bends them
    torch.testing.assert_close(run_kernel(step, 0.3, 5.0), expected, atol=ATOL, rtol=1e-5)


# Triton's interpreter multiplies bfloat16 dot operands as their raw bits: bfloat16 q only on CUDA.
@pytest.mark.parametrize(
    ("dtype", "atol"),
    [(torch.float16, 1e-2), *([(torch.bfloat16, 4e-2)] if DEVICE.type == "cuda" else [])],
)
def test_16_bit_queries_run_their_dots_in_16_bits(dtype, atol) -> None:
    """q in the model's 16-bit compute dtype: K/V tiles and probabilities are rounded to it for
    the dots (float32 accumulation), so the bound is the dtype's rounding."""
    step = make_step(HEADS["gqa3"], "int8", 16, 24, 4, *SHAPES["mixed"])
    expected = reference(step, 0.125, None)
    got = run_kernel(step, 0.125, q=step.kernel_query().to(DEVICE, dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=1e-2)


# Built for a GPU without one: triton compiles for a target (ptxas ships in its wheel). In a
# fresh process, since this one defined the kernels for the interpreter.
BUILD_FOR_SM90 = """
import re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvlm.kernels.triton_paged import _paged_attention_kernel as kernel, launch_options
from kvlm.kv.spec import KVCacheSpec

STORED = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*i16", "int8": "*i8",
          "int4": "*u8", "fp8": "*u8"}
kv_format, heads, kv_heads, head_dim, window, sinks, q_dtype, decode = sys.argv[1:]
spec = KVCacheSpec((0,), int(kv_heads), int(head_dim), 16, kv_format,
                   int(window) or None, int(sinks))
options = launch_options(spec, int(heads), getattr(torch, q_dtype), decode == "decode")
num_warps = options.pop("num_warps")
q = "*fp32" if q_dtype == "float32" else "*bf16"
types = [q, q, q, STORED[kv_format], "*fp16" if spec.format.is_quantized else STORED[kv_format],
         "*i64", "*i64", "*i64", *["i32"] * 17, "fp32", "fp32"]
names = kernel.arg_names
signature = {**dict(zip(names, types, strict=False)), **{n: "constexpr" for n in names[27:]}}
constants = {**options, "SOFTCAP": True}
built = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(built.asm["cubin"])
    f.flush()
    tool = triton.__path__[0] + "/backends/nvidia/bin/cuobjdump"
    usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
print(re.search(r"REG:\\d+ STACK:\\d+", usage).group())
"""


@pytest.mark.parametrize(
    ("case", "spill_free"),
    [
        (("int8", 9, 3, 64, 0, 0, "bfloat16", "decode"), True),  # SmolLM2 decoding on a GPU
        # Gemma 3's local layers with sinks: int4, a second q (sink_q) for the sink keys; it
        # spills to local memory today (STACK 408 bytes at 8 warps, 584 when keys were roped in
        # registers), a tuning item for a GPU.
        (("int4", 4, 1, 256, 512, 4, "float32", "chunk"), False),
    ],
    ids=["smollm2-int8-decode", "gemma3-int4-sinks-chunk"],
)
def test_builds_for_sm90(case, spill_free) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", BUILD_FOR_SM90, *map(str, case)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if spill_free:
        assert done.stdout.strip().endswith("STACK:0"), done.stdout  # registers only


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


@pytest.mark.parametrize("kv_format", ["float32", "int4"])
def test_sinks_are_streaming_llm_far_past_a_models_context(kv_format) -> None:
    """As the C++ kernel's test: keys stored roped by text position (3,000 and more), no key
    roped in the kernel, the answer is StreamingLLM's (keys and queries by place in the cache);
    the sinks scored against q at its text position instead are far off."""
    step = make_step(HEADS["gqa3"], kv_format, 16, 24, 4, [3000, 40, 2990], [1, 1, 20])
    reference(step, 0.125, None)  # writes this step's K/V
    expected = streaming_llm(step, 0.125)
    torch.testing.assert_close(run_kernel(step, 0.125), expected, atol=1e-4, rtol=1e-4)
    text_q = step.kernel_query().to(DEVICE)
    assert _far(run_kernel(step, 0.125, sink_q=text_q), expected)


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
    width = step.block_table.shape[1]
    with pytest.raises(ValueError, match=f"past {width} blocks of 16"):
        run_kernel(step, 0.1, num_cached=step.num_cached + 16 * width)
    with pytest.raises(ValueError, match="query_start"):
        run_kernel(step, 0.1, num_cached=step.num_cached[:2])
    with pytest.raises(ValueError, match="int32 or int64"):
        run_kernel(step, 0.1, num_cached=step.num_cached.float())
    with pytest.raises(ValueError, match="needs `sink_q`"):
        run_kernel(step, 0.1, sink_q=None)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        run_kernel(step, 0.1, q=step.q.double().to(DEVICE))
