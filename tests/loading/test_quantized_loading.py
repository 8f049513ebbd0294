"""weight_format "gguf" keeps GGUF matrices quantized, and they hold exactly the float values."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kvlm.kernels import QuantizedTensor
from kvlm.loading import ModelLoadError, load_model
from kvlm.loading.quantize import quantize_float_matrices


@pytest.mark.parametrize("model", ["smollm2", "gemma3-270m"])
def test_quantized_matrices_equal_the_float_loaders_exactly(model: str) -> None:
    quantized = load_model(model, weight_format="gguf").weights
    float_weights = load_model(model, weight_format="float").weights
    assert quantized.keys() == float_weights.keys()
    num_quantized = 0
    for name, w in quantized.items():
        if isinstance(w, QuantizedTensor):
            num_quantized += 1
            # includes llama's q/k rows, un-permuted as whole quantized rows
            assert torch.equal(w.dequantize(), float_weights[name]), name
        else:
            assert torch.equal(w, float_weights[name]), name
    assert isinstance(quantized["token_embd.weight"], QuantizedTensor)
    assert num_quantized > 7 * 30 // 2


def test_unknown_weight_format_is_rejected() -> None:
    with pytest.raises(ModelLoadError, match="weight_format 'int3'"):
        load_model("smollm2", weight_format="int3")


@pytest.mark.parametrize("weight_format", ["q8_0", "q4_1"])
def test_float_matrices_quantize_at_load_like_gguf(weight_format: str) -> None:
    qtype = gguf.GGMLQuantizationType[weight_format.upper()]
    weights = {
        "blk.0.attn_q.weight": torch.randn(48, 64),
        "blk.0.attn_norm.weight": torch.randn(64),
        "blk.0.ffn_down.weight": torch.randn(16, 40),  # rows not whole 32-blocks: stays float
    }
    expected = gguf.quants.dequantize(
        gguf.quants.quantize(weights["blk.0.attn_q.weight"].numpy(), qtype), qtype
    )
    quantize_float_matrices(weights, weight_format)
    assert isinstance(weights["blk.0.attn_q.weight"], QuantizedTensor)
    assert np.array_equal(weights["blk.0.attn_q.weight"].dequantize().numpy(), expected)
    assert not isinstance(weights["blk.0.attn_norm.weight"], QuantizedTensor)
    assert not isinstance(weights["blk.0.ffn_down.weight"], QuantizedTensor)
