"""The small building blocks every architecture shares: linear, RMSNorm, activations.

Notation: T = tokens in this step (all sequences concatenated), H = hidden size,
nh / nkv = query / key-value heads, hd = head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvlm.kernels import QuantizedTensor


class Linear(nn.Module):
    """y = x @ W.T — the one interface every projection goes through.

    Holding weights behind this class is what lets another weight format replace it without
    touching the model code. `split` returns the output columns of several fused projections
    (qkv, gate/up) in one matmul. A `QuantizedTensor` weight (GGUF blocks kept quantized) goes
    to kvlm's kernels, which quantize `x` once for all fused parts; a float weight takes the
    path below, unchanged.

    The float GEMM is issued in the orientation the CPU BLAS runs fastest for the row count
    (measured on this 2-core machine over all SmolLM2 fp32 weights, ms per forward): one row
    costs 28 as a duplicated two-column `W @ x.T` vs 42 for `F.linear` (the GEMV path is slow);
    2-64 rows cost 27-65 as `W @ x.T` vs 46-92 for `F.linear`; past `GEMM_ROWS_MAX` rows
    (prefill) `F.linear` wins again.
    """

    GEMM_ROWS_MAX = 64

    def __init__(self, weight: torch.Tensor, out_splits: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out_features, in_features]
        self.quantized = isinstance(weight, QuantizedTensor)
        self.out_splits = out_splits

    @classmethod
    def fused(cls, *weights: torch.Tensor) -> Linear:
        splits = tuple(w.shape[0] for w in weights)
        quantized = [isinstance(w, QuantizedTensor) for w in weights]
        if all(quantized):
            return cls(QuantizedTensor.stack(weights), splits)
        if any(quantized):  # a float part among quantized ones: fuse in float
            dtype = next(w.dtype for w in weights if not isinstance(w, QuantizedTensor))
            weights = tuple(
                w.dequantize().to(dtype) if isinstance(w, QuantizedTensor) else w for w in weights
            )
        return cls(torch.cat(weights, dim=0), splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [M, in_features]
        num_rows = rows.shape[0]
        if self.quantized:
            out = self.weight.linear(rows.float()).to(x.dtype)
        elif num_rows > self.GEMM_ROWS_MAX or not rows.is_cpu or rows.dtype != torch.float32:
            out = F.linear(rows, self.weight)  # cuBLAS and oneDNN's bf16 kernels pick well
        elif num_rows == 1:
            out = (self.weight @ torch.cat((rows, rows)).T)[:, :1].T.contiguous()
        else:
            out = (self.weight @ rows.T).T.contiguous()
        return out.view(*x.shape[:-1], self.weight.shape[0])  # [..., out_features]

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert self.out_splits is not None, "split() needs a fused Linear"
        return self(x).split(self.out_splits, dim=-1)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32. `weight` is the full scale (Gemma's 1+w folded)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)  # [dim], float32
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps)
        return normed.to(x.dtype)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


def activation(name: str) -> nn.Module:
    """The activation a `ModelConfig.hidden_act` names; a name kvlm does not know is an error,
    never a stand-in (a wrong activation still runs, and produces fluent-looking nonsense)."""
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}: kvlm implements {', '.join(map(repr, _ACTIVATIONS))}"
        )
    return _ACTIVATIONS[name]()
