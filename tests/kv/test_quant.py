"""KV storage formats: round-trip error bounds, int4 packing, sizes, odd shapes."""

from __future__ import annotations

import pytest
import torch

from kvlm.kv.quant import MIN_SCALE, KVFormat, KVFormatError


def _roundtrip(name: str, x: torch.Tensor) -> torch.Tensor:
    fmt = KVFormat(name, x.shape[-1])
    data, scales = fmt.quantize(x)
    assert data.shape == (*x.shape[:-1], fmt.row_elements)
    if fmt.is_quantized:
        assert scales.shape == (*x.shape[:-1], fmt.num_scales)
    return fmt.dequantize(data, scales, torch.float32)


@pytest.mark.parametrize("shape", [(5, 3, 64), (1, 1, 256), (7, 2, 48), (3, 1, 6)])
def test_int8_error_is_within_half_a_step_of_each_rows_scale(shape) -> None:
    x = torch.randn(shape) * torch.logspace(-3, 2, shape[0])[:, None, None]
    out = _roundtrip("int8", x)
    step = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(MIN_SCALE)
    # half a quantization step, plus float16 rounding of the scale (relative 2^-11 of absmax)
    assert ((out - x).abs() <= step * 0.5 + x.abs().amax(-1, keepdim=True) * 2**-10).all()


@pytest.mark.parametrize("shape", [(5, 3, 64), (2, 1, 256), (4, 2, 96), (4, 2, 48), (3, 1, 6)])
def test_int4_error_is_within_half_a_step_of_each_groups_scale(shape) -> None:
    """Measured where the values are quantized: after the head's rotation, which is
    orthonormal, so the error's norm is the same before and after it is undone."""
    x = torch.randn(shape)
    fmt = KVFormat("int4", shape[-1])
    out = _roundtrip("int4", x)
    groups = fmt._rotate(x).unflatten(-1, (fmt.num_scales, fmt.group_size))
    absmax = groups.abs().amax(-1, keepdim=True)
    bound = (absmax / 7 * 0.5 + absmax * 2**-10).expand_as(groups).flatten(-2)  # per value
    assert ((out - x).norm(dim=-1) <= bound.norm(dim=-1) * (1 + 1e-5)).all()


def test_int4_rotation_spreads_an_outlier_channel() -> None:
    """One channel 30x the others: the rotation shares it out, so the small channels keep
    their resolution. The rotation is orthonormal and its own inverse."""
    fmt = KVFormat("int4", 64)
    assert fmt.rotation_size == 64 and KVFormat("int4", 96).rotation_size == 32
    assert KVFormat("int4", 6).rotation_size is None and KVFormat("int8", 64).rotation_size is None
    x = torch.randn(256, 64)
    assert torch.allclose(fmt._rotate(fmt._rotate(x)), x, atol=1e-5)
    x[:, 5] *= 30
    rotated_error = (_roundtrip("int4", x) - x).norm() / x.norm()
    groups = x.unflatten(-1, (2, 32))
    plain = (groups / (groups.abs().amax(-1, keepdim=True) / 7)).round().clamp(-8, 7)
    plain = plain * groups.abs().amax(-1, keepdim=True) / 7
    plain_error = (plain.flatten(-2) - x).norm() / x.norm()
    assert rotated_error < 0.75 * plain_error


def test_int4_groups_are_32_wide_when_head_dim_allows() -> None:
    assert KVFormat("int4", 64).num_scales == 2
    assert KVFormat("int4", 256).num_scales == 8
    assert KVFormat("int4", 48).num_scales == 1  # 48 is no multiple of 32: one group


def test_int4_packs_even_index_low_nibble() -> None:
    fmt = KVFormat("int4", 6)  # 6 is no power of two nor multiple of 32: not rotated
    x = torch.tensor([[7.0, -8.0, 0.0, 7.0, 0.0, 1.0]])  # scale 8/7: q = 6, -7, 0, 6, 0, 1
    data, scales = fmt.quantize(x)
    q = torch.tensor([6, -7, 0, 6, 0, 1]) + 8
    assert data.tolist() == [[int(q[i] | q[i + 1] << 4) for i in (0, 2, 4)]]
    assert scales.item() == pytest.approx(8 / 7, rel=1e-3)


def test_fp8_keeps_three_mantissa_bits() -> None:
    x = torch.randn(6, 2, 64)
    out = _roundtrip("fp8", x)
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normal values, plus the scale's
    big = x.abs() > x.abs().amax(-1, keepdim=True) / 64
    assert ((out - x).abs()[big] <= x.abs()[big] * (2**-4 + 2**-10)).all()


def test_zero_rows_come_back_zero() -> None:
    for name in ("int8", "int4", "fp8"):
        assert torch.equal(_roundtrip(name, torch.zeros(2, 1, 64)), torch.zeros(2, 1, 64))


def test_float_formats_are_exact_casts() -> None:
    x = torch.randn(3, 2, 64)
    assert torch.equal(_roundtrip("float32", x), x)
    assert torch.equal(_roundtrip("bfloat16", x), x.bfloat16().float())


def test_bytes_per_token_head_include_scales() -> None:
    assert KVFormat("float16", 64).nbytes == 128
    assert KVFormat("int8", 64).nbytes == 64 + 2 * 2
    assert KVFormat("int4", 64).nbytes == 32 + 2 * 2
    assert KVFormat("fp8", 256).nbytes == 256 + 8 * 2
    # int4 uses >= 3.5x less memory than fp16, scales included
    assert KVFormat("float16", 64).nbytes / KVFormat("int4", 64).nbytes >= 3.5


def test_bad_formats_are_refused() -> None:
    with pytest.raises(KVFormatError, match="unknown KV format 'int3'"):
        KVFormat("int3", 64)
    with pytest.raises(KVFormatError, match="head_dim 5 is odd"):
        KVFormat("int4", 5)
