"""y = x @ W.T for quantized W: activations quantized once, then one kernel call per weight part.

`parts` are matrices stacked along out_features (a fused q/k/v or gate/up whose GGUF types
differ keeps one part per format); they share one int8 quantization of `x`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kvlm.kernels.build import ISA_CODES, resolve_path
from kvlm.kernels.formats import QuantizedWeight


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (qa int8 [M, Kp], da float32 [M, Kp / 32], asum int32 [M, Kp / 16]).

    Per block of 32 columns: da = max|x| / 127, qa = round-half-even(x / da), asum = sum of qa
    over each 16 columns. Kp pads K to a multiple of 32 with zeros.
    """
    return torch.ops.kvlm.quantize_act(x)


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same quantization in torch (tests hold the C++ one to it)."""
    num_rows, in_features = x.shape
    padded = -(-in_features // 32) * 32
    blocks = F.pad(x.float(), (0, padded - in_features)).view(num_rows, -1, 32)
    da = blocks.abs().amax(-1) / 127.0
    inv = torch.where(da > 0, 1.0 / da, torch.zeros_like(da))
    qa = torch.round(blocks * inv[..., None]).to(torch.int8)
    asum = qa.view(num_rows, -1, 16).sum(-1, dtype=torch.int32)
    return qa.view(num_rows, padded), da, asum


def matmul(
    x: torch.Tensor, parts: Sequence[QuantizedWeight], path: str | None = None
) -> torch.Tensor:
    """x [M, K] float32 -> [M, sum of parts' out_features] float32.

    `path` picks the kernels (see build.PATHS; None = the process default). "torch" multiplies
    by the dequantized weights in float32 (kept after first use): the exact reference, as
    large as a float model and slower than the kernels.
    """
    path = resolve_path(path)
    if path == "torch":
        return torch.cat([F.linear(x, w.dense()) for w in parts], dim=-1)
    isa = ISA_CODES[path]
    if len(parts) == 1:
        w = parts[0]
        fmt = w.format
        return torch.ops.kvlm.qlinear(
            x, w.packed, fmt.bits, fmt.group, fmt.scale_bytes, w.out_features, isa
        )
    qa, da, asum = quantize_activations(x)
    outs = [
        torch.ops.kvlm.qgemm(
            qa,
            da,
            asum,
            w.packed,
            w.format.bits,
            w.format.group,
            w.format.scale_bytes,
            w.out_features,
            isa,
        )  # fmt: skip
        for w in parts
    ]
    return torch.cat(outs, dim=-1)
