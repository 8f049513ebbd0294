"""GGUF quantized blocks -> PlainQuant, exactly: no weight passes through float32.

Each GGUF format is `w = scale * q + min` with small unsigned integers q once its offsets are
folded into the minimum, so the kernels' (q, d, m) form holds it without rounding:

| GGUF | block | kernel form |
|---|---|---|
| Q4_0 | 32: fp16 d, 4-bit q | 4-bit, d, m = -8 d |
| Q4_1 | 32: fp16 d, fp16 m, 4-bit q | 4-bit, d, m |
| Q4_K | 256: fp16 d, dmin, 6-bit (sc, mn) per 32, 4-bit q | 4-bit, d * sc, -(dmin * mn) |
| Q5_0 | 32: fp16 d, 5-bit q | 6-bit, d, m = -16 d |
| Q5_1 | 32: fp16 d, m, 5-bit q | 6-bit, d, m |
| Q5_K | like Q4_K with 5-bit q | 6-bit, d * sc, -(dmin * mn) |
| Q6_K | 256: fp16 d, int8 sc per 16, 6-bit q | 6-bit groups of 16, d * sc, -32 (d * sc) |
| Q8_0 | 32: fp16 d, int8 q | 8-bit, d, m = -128 d, q + 128 |

(6-bit formats are one byte per value, marked by `QuantizedWeight.pack` when every q < 64.)
The products d * sc and dmin * mn are formed in float32 as ggml does, and every w = d * q + m
equals ggml's float32 result (the products are exact, the one sum rounds the same way).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from kvlm.kernels.formats import PlainQuant

Q = gguf.GGMLQuantizationType
REPACKABLE = (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] uint8 -> [..., 2n]: all low nibbles, then all high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(scales: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit minimums per super-block."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return torch.from_numpy(sc.astype(np.float32)), torch.from_numpy(mn.astype(np.float32))


def repack_gguf(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> PlainQuant:
    """One GGUF tensor's raw bytes ([rows, bytes per row]) as a PlainQuant of `shape`.

    The bit unpacking runs in numpy (several times faster than torch on uint8)."""
    num_rows, in_features = shape
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if in_features % block_elems or in_features % 32:
        raise ValueError(f"{qtype.name} row of {in_features} is not whole blocks")
    blocks = np.ascontiguousarray(raw).reshape(num_rows, -1, block_bytes)
    q, d, m, bits, group = _decode(blocks, qtype)
    return PlainQuant(
        torch.from_numpy(np.ascontiguousarray(q).reshape(num_rows, in_features)),
        d.reshape(num_rows, -1).contiguous(),
        m.reshape(num_rows, -1).contiguous(),
        bits,
        group,
        in_features,
    )


def _decode(blocks: np.ndarray, qtype: Q):
    """[rows, blocks, bytes] -> q [rows, blocks, ...] uint8, d and m [rows, groups], bits, G."""
    if qtype == Q.Q8_0:
        d = _f16(blocks[..., 0:2])
        return blocks[..., 2:] ^ 0x80, d, -128.0 * d, 8, 32  # int8 q + 128 == q ^ 0x80
    if qtype == Q.Q4_0:
        d = _f16(blocks[..., 0:2])
        return _nibbles(blocks[..., 2:]), d, -8.0 * d, 4, 32
    if qtype == Q.Q4_1:
        return _nibbles(blocks[..., 4:]), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]), 4, 32
    if qtype in (Q.Q5_0, Q.Q5_1):
        start = 4 if qtype == Q.Q5_1 else 2
        high = np.unpackbits(blocks[..., start : start + 4], axis=-1, bitorder="little")
        q = _nibbles(blocks[..., start + 4 :]) | (high << 4)
        d = _f16(blocks[..., 0:2])
        m = _f16(blocks[..., 2:4]) if qtype == Q.Q5_1 else -16.0 * d
        return q, d, m, 8, 32
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc, mn = _k_scales(blocks[..., 4:16])
        rows, num_blocks = blocks.shape[:2]
        if qtype == Q.Q4_K:
            # 4 chunks of 32 bytes: low nibbles are sub-block 2i, high nibbles sub-block 2i + 1
            q = _nibbles(blocks[..., 16:].reshape(rows, num_blocks, 4, 32))
            bits = 4
        else:
            qs = blocks[..., 48:].reshape(rows, num_blocks, 4, 32)
            high = np.unpackbits(blocks[..., 16:48, None], axis=-1, bitorder="little")
            high = high.swapaxes(-1, -2).reshape(rows, num_blocks, 4, 64)  # bit j: sub-block j
            q = _nibbles(qs) | (high << 4)
            bits = 8
        return q, d[..., None] * sc, -(dmin[..., None] * mn), bits, 32
    if qtype == Q.Q6_K:
        rows, num_blocks = blocks.shape[:2]
        ql = blocks[..., 0:128].reshape(rows, num_blocks, 2, 64)
        qh = blocks[..., 128:192].reshape(rows, num_blocks, 2, 1, 32)
        sc = torch.from_numpy(np.ascontiguousarray(blocks[..., 192:208]).view(np.int8))
        d = _f16(blocks[..., 208:210])
        low = _nibbles(ql).reshape(rows, num_blocks, 2, 4, 32)
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 0x03
        q = low | (high << 4)  # [rows, blocks, 2 halves, 4 quarters, 32]
        scale = d[..., None] * sc.float()  # [rows, blocks, 16 groups of 16]
        return q, scale, -32.0 * scale, 8, 16
    raise ValueError(f"GGUF type {qtype.name} has no kernel format")
