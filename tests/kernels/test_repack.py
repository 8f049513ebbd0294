"""Repacking is exact: the kernels' layout holds every GGUF value ggml would produce."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kvlm.kernels import PlainQuant, QuantizedTensor, QuantizedWeight, repack_gguf
from tests.kernels.conftest import gguf_tensor

Q = gguf.GGMLQuantizationType


def _cols(qtype: Q) -> int:
    return 512 if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 96  # 96: not a multiple of 256


@pytest.mark.parametrize("rows", [16, 40])  # 40: the last tile is partly padding
def test_repacked_dequantizes_to_ggml_values_exactly(qtype: Q, rows: int) -> None:
    raw, expected = gguf_tensor(qtype, rows, _cols(qtype))
    plain = repack_gguf(raw, qtype, (rows, _cols(qtype)))
    assert np.array_equal(plain.dequantize().numpy(), expected)
    packed = QuantizedWeight.pack(plain)
    assert packed.packed.shape[0] == -(-rows // 16)
    assert np.array_equal(packed.dequantize().numpy(), expected)


def test_fp16_scales_only_where_exact() -> None:
    formats = {}
    for qtype in (Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_0):
        raw, _ = gguf_tensor(qtype, 16, _cols(qtype))
        formats[qtype] = QuantizedWeight.pack(repack_gguf(raw, qtype, (16, _cols(qtype))))
    assert formats[Q.Q4_1].format.name == "u4g32f16"
    assert formats[Q.Q8_0].format.name == "s8g32f16"  # m = -128 d: not stored
    assert formats[Q.Q4_K].format.name == "u4g32f32"  # d * 6-bit scale needs 17 bits
    assert formats[Q.Q6_K].format.name == "u6g16f32"  # 16-column groups, q < 64
    assert formats[Q.Q5_0].format.name == "u6g32f16"


def test_unpack_round_trips_and_rows_permute_whole() -> None:
    raw, expected = gguf_tensor(Q.Q4_1, 48, 64)
    plain = repack_gguf(raw, Q.Q4_1, (48, 64))
    unpacked = QuantizedWeight.pack(plain).unpack()
    assert torch.equal(unpacked.q, plain.q) and torch.equal(unpacked.d, plain.d)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    permuted = plain.permute_rows(order).dequantize()
    assert torch.equal(permuted, torch.from_numpy(expected)[order])


def test_widening_keeps_values() -> None:
    raw, expected = gguf_tensor(Q.Q4_1, 16, 64)
    wide = repack_gguf(raw, Q.Q4_1, (16, 64)).widened(8, 16)
    assert (wide.bits, wide.group) == (8, 16)
    assert np.array_equal(QuantizedWeight.pack(wide).dequantize().numpy(), expected)


def test_dequantize_rows_gathers_embedding_rows() -> None:
    raw, expected = gguf_tensor(Q.Q8_0, 50, 64)
    weight = QuantizedTensor.from_plain(repack_gguf(raw, Q.Q8_0, (50, 64)))
    ids = torch.tensor([[49, 0, 17], [17, 3, 33]])
    got = torch.nn.functional.embedding(ids, weight)  # through __torch_dispatch__
    assert torch.equal(got, torch.from_numpy(expected)[ids])


def test_stack_fuses_same_formats_and_keeps_others_apart() -> None:
    parts = {
        qt: QuantizedTensor.from_plain(repack_gguf(gguf_tensor(qt, n, 256)[0], qt, (n, 256)))
        for qt, n in ((Q.Q5_0, 32), (Q.Q8_0, 16), (Q.Q6_K, 16))
    }
    # An 8-bit matrix with stored minimums (Q8_0's quants, m = -64 d: still exact in fp16)
    # shares Q5_0's byte layout
    plain = repack_gguf(gguf_tensor(Q.Q8_0, 16, 256, seed=3)[0], Q.Q8_0, (16, 256))
    plain.m = plain.m / 2
    asymmetric = QuantizedTensor.from_plain(plain)
    tensors = [parts[Q.Q5_0], asymmetric, parts[Q.Q8_0], parts[Q.Q6_K]]
    fused = QuantizedTensor.stack(tensors)
    assert fused.shape == (80, 256)
    # Q5_0 (u6g32f16) and the u8g32f16 matrix merge into one part; Q8_0 without minimums
    # (s8g32f16) and Q6_K's 16-column groups stay apart
    assert [(p.out_features, p.format.name) for p in fused.parts] == [
        (48, "u8g32f16"),
        (16, "s8g32f16"),
        (16, "u6g16f32"),
    ]
    expected = torch.cat([t.dequantize() for t in tensors])
    assert torch.equal(fused.dequantize(), expected)


def test_quantized_tensor_refuses_other_ops() -> None:
    raw, _ = gguf_tensor(Q.Q8_0, 16, 32)
    weight = QuantizedTensor.from_plain(repack_gguf(raw, Q.Q8_0, (16, 32)))
    with pytest.raises(NotImplementedError, match="weight_format='float'"):
        weight + 1
    assert isinstance(torch.nn.Parameter(weight, requires_grad=False), QuantizedTensor)


def test_plain_cat_widens_to_common_format() -> None:
    a = repack_gguf(gguf_tensor(Q.Q4_0, 16, 256)[0], Q.Q4_0, (16, 256))
    b = repack_gguf(gguf_tensor(Q.Q6_K, 8, 256)[0], Q.Q6_K, (8, 256))
    both = PlainQuant.cat([a, b])
    assert (both.bits, both.group) == (8, 16)
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
