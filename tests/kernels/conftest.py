"""Shared builders: GGUF tensors of every repackable type, as raw bytes plus ggml's values."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from kvlm.kernels import available_paths

Q = gguf.GGMLQuantizationType
# gguf-py quantizes these itself; K-quants it only dequantizes, so those get random blocks.
QUANTIZABLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
_F16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of fp16 scales
KERNEL_PATHS = [p for p in ("avx512", "avx2", "ref") if p in available_paths()]


def gguf_tensor(qtype: Q, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw [rows, bytes per row] uint8, ggml's float32 values [rows, cols])."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        weights = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
        raw = gguf.quants.quantize(weights, qtype)
    else:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
        for offset in _F16_FIELDS[qtype]:
            scale = rng.uniform(1e-4, 2e-3, blocks.shape[:2]).astype(np.float16)
            blocks[..., offset : offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
        raw = blocks.reshape(rows, -1)
    values = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    return raw, values


@pytest.fixture(params=QUANTIZABLE + K_QUANTS, ids=lambda t: t.name)
def qtype(request) -> Q:
    return request.param
