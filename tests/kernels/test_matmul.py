"""The matmul kernels against a float32 reference, on every path this machine runs.

Every SIMD path performs the scalar reference's float operations in the same order, so they
must equal it bit for bit; all of them must stay within the error that int8 activation
quantization allows: |y - x @ W.T| <= sum_k |W[n, k]| * da(k) / 2, plus float rounding.
"""

from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F

from kvlm.kernels import KernelUnavailableError, QuantizedTensor, QuantizedWeight, repack_gguf
from kvlm.kernels.matmul import matmul, quantize_activations, quantize_activations_reference
from tests.kernels.conftest import KERNEL_PATHS, gguf_tensor

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not KERNEL_PATHS, reason="the C++ kernels are not built here")


def _weight(qtype: Q, rows: int, cols: int) -> tuple[QuantizedWeight, torch.Tensor]:
    raw, values = gguf_tensor(qtype, rows, cols, seed=rows + cols)
    return QuantizedWeight.pack(repack_gguf(raw, qtype, (rows, cols))), torch.from_numpy(values)


def _error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Largest |error| int8 activation blocks of 32 can cause, per output (plus 1e-4 relative)."""
    _, da, _ = quantize_activations_reference(x)  # [M, Kp / 32]
    half_step = (da / 2).repeat_interleave(32, dim=1)[:, : x.shape[1]]  # [M, K]
    exact = x.double() @ w.double().T
    return half_step.double() @ w.abs().double().T + 1e-4 * exact.abs() + 1e-5


@pytest.mark.parametrize("num_rows", [1, 3, 16, 17, 64])  # 16+: AMX tiles where the CPU has them
@pytest.mark.parametrize("shape", [(40, 256), (16, 512)], ids=["40x256", "16x512"])
def test_kernels_match_reference_and_each_other(qtype: Q, num_rows: int, shape) -> None:
    out_features, in_features = shape
    w, values = _weight(qtype, out_features, in_features)
    x = torch.randn(num_rows, in_features, generator=torch.Generator().manual_seed(num_rows))
    expected = x @ values.T
    bound = _error_bound(x, values)
    outs = {path: matmul(x, [w], path) for path in KERNEL_PATHS}
    for path, y in outs.items():
        assert y.shape == (num_rows, out_features)
        assert ((y.double() - expected.double()).abs() <= bound).all(), path
        assert torch.equal(y, outs["ref"]), f"{path} differs from the scalar reference"


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split()[2:]) for line in f if line.startswith("flags")), set())


@pytest.mark.skipif("avx512" not in KERNEL_PATHS, reason="AMX tiles run on the avx512 path")
@pytest.mark.skipif(
    not {"amx_tile", "amx_int8"} <= _cpu_flags(), reason="this CPU has no AMX int8 tiles"
)
def test_amx_tiles_run_where_the_cpu_has_them() -> None:
    # Where this holds, the avx512 results above at 16+ rows came from the tile kernel.
    assert torch.ops.kvlm.amx_status() == ""


@pytest.mark.parametrize("num_rows", [1, 5])
def test_8bit_with_and_without_stored_minimums(num_rows: int) -> None:
    # Q8_0 packs symmetric (its minimums, -128 d, are not stored); the same quants with other
    # minimums keep them. Both give the dequantized values' product on every path.
    w, values = _weight(Q.Q8_0, 40, 256)
    assert w.format.symmetric and w.format.block_bytes == 16 * 32 + 16 * 2
    plain = w.unpack()
    plain.m = plain.m + 0.01 * torch.rand(plain.m.shape, generator=torch.Generator().manual_seed(1))
    asymmetric = QuantizedWeight.pack(plain)  # m no longer fp16-exact: fp32 d and m
    assert not asymmetric.format.symmetric and asymmetric.format.block_bytes == 16 * 32 + 16 * 8
    x = torch.randn(num_rows, 256, generator=torch.Generator().manual_seed(num_rows))
    for weight, reference in ((w, values), (asymmetric, plain.dequantize())):
        bound = _error_bound(x, reference)
        outs = {path: matmul(x, [weight], path) for path in KERNEL_PATHS}
        for path, y in outs.items():
            assert ((y.double() - (x @ reference.T).double()).abs() <= bound).all(), path
            assert torch.equal(y, outs["ref"]), path
        rows = torch.tensor([0, 17, 39])
        assert torch.equal(weight.dequantize_rows(rows), reference[rows])


@pytest.mark.parametrize("in_features", [32, 96, 100])  # 100: padded to 128 with zeros
def test_odd_in_features(in_features: int) -> None:
    # Q8_0/Q4_1 rows are whole 32-blocks; 100 columns come from quantize-at-load padding.
    cols = -(-in_features // 32) * 32
    w, values = _weight(Q.Q4_1, 24, cols)
    if cols != in_features:  # zero the padded columns, as a 100-column matrix would have
        values = values[:, :in_features]
        plain = w.unpack()
        plain.in_features = in_features
        w = QuantizedWeight.pack(plain)
    x = torch.randn(5, in_features)
    for path in KERNEL_PATHS:
        y = matmul(x, [w], path)
        assert ((y.double() - (x @ values.T).double()).abs() <= _error_bound(x, values)).all()


@pytest.mark.parametrize("num_threads", [1, 2])
def test_thread_counts_agree(num_threads: int) -> None:
    w, _ = _weight(Q.Q4_K, 200, 512)
    x = torch.randn(9, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = {path: matmul(x, [w], path) for path in KERNEL_PATHS}
        torch.set_num_threads(num_threads)
        for path in KERNEL_PATHS:
            assert torch.equal(matmul(x, [w], path), single[path])
    finally:
        torch.set_num_threads(before)


def test_stacked_parts_share_activations() -> None:
    parts = [_weight(Q.Q4_K, 32, 256), _weight(Q.Q6_K, 24, 256), _weight(Q.Q8_0, 16, 256)]
    fused = QuantizedTensor.stack(
        [QuantizedTensor([w]) for w, _ in parts]
    )  # three formats: three parts
    assert len(fused.parts) == 3
    x = torch.randn(4, 256)
    for path in KERNEL_PATHS:
        separate = torch.cat([matmul(x, [w], path) for w, _ in parts], dim=1)
        assert torch.equal(fused.linear(x, path), separate)


def test_torch_path_is_the_exact_float_product() -> None:
    w, values = _weight(Q.Q5_K, 20, 256)
    x = torch.randn(3, 256)
    assert torch.equal(matmul(x, [w], "torch"), F.linear(x, values))


def test_activation_quantization_matches_torch_reference() -> None:
    x = torch.randn(7, 100) * torch.logspace(-3, 2, 100)  # outlier columns, a padded tail
    x[2] = 0.0  # an all-zero row: scale 0, no division by zero
    for got, want in zip(quantize_activations(x), quantize_activations_reference(x), strict=True):
        assert torch.equal(got, want)


def test_unavailable_path_is_an_error() -> None:
    w, _ = _weight(Q.Q8_0, 16, 32)
    with pytest.raises(KernelUnavailableError, match="unknown kernel path"):
        matmul(torch.randn(1, 32), [w], "neon")
    missing = [p for p in ("avx512", "avx2") if p not in KERNEL_PATHS]
    for path in missing:
        with pytest.raises(KernelUnavailableError, match="cannot run here"):
            matmul(torch.randn(1, 32), [w], path)


def test_ops_have_fake_implementations() -> None:
    w, _ = _weight(Q.Q4_1, 40, 64)
    fmt = w.format
    x = torch.randn(3, 64)
    qa, da, asum = torch.ops.kvlm.quantize_act(x)
    args = (qa, da, asum, w.packed, fmt.bits, fmt.group, fmt.scale_bytes, 40, 0)
    torch.library.opcheck(torch.ops.kvlm.quantize_act.default, (x,))
    torch.library.opcheck(torch.ops.kvlm.qgemm.default, args)
    torch.library.opcheck(
        torch.ops.kvlm.qlinear.default, (x, w.packed, fmt.bits, fmt.group, fmt.scale_bytes, 40, 0)
    )
    meta = torch.ops.kvlm.qlinear(
        x.to("meta"), w.packed.to("meta"), fmt.bits, fmt.group, fmt.scale_bytes, 40, 0
    )
    assert meta.shape == (3, 40) and meta.dtype == torch.float32


def test_bad_arguments_raise_instead_of_crashing() -> None:
    w, _ = _weight(Q.Q4_1, 16, 64)
    fmt = w.format
    with pytest.raises(RuntimeError, match="input columns"):
        torch.ops.kvlm.qlinear(torch.randn(1, 96), w.packed, 4, 32, fmt.scale_bytes, 16, 0)
    with pytest.raises(RuntimeError, match="not available"):
        torch.ops.kvlm.qlinear(torch.randn(1, 64), w.packed, 4, 32, fmt.scale_bytes, 16, 9)
