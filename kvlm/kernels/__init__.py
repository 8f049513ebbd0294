"""Quantized weights kept quantized: formats, GGUF repacking and the C++ matmul kernels.

`QuantizedTensor` is what loaders hand the model for a quantized weight; `Linear` calls its
`linear`. The C++ extension is compiled on first use (see `build`); without a compiler, or on a
CPU without AVX2, the same API runs in torch on dequantized weights.
"""

from kvlm.kernels.build import (
    ENV_VAR,
    PATHS,
    KernelUnavailableError,
    available_paths,
    kernel_status,
)
from kvlm.kernels.formats import PackFormat, PlainQuant, QuantizedWeight
from kvlm.kernels.gguf_repack import REPACKABLE, repack_gguf
from kvlm.kernels.tensor import QuantizedTensor

__all__ = [
    "ENV_VAR",
    "PATHS",
    "REPACKABLE",
    "KernelUnavailableError",
    "PackFormat",
    "PlainQuant",
    "QuantizedTensor",
    "QuantizedWeight",
    "available_paths",
    "kernel_status",
    "repack_gguf",
]
