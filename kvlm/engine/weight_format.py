"""What `weight_format="auto"` (the default) means for one model on one machine (issue 10)."""

from __future__ import annotations

from pathlib import Path

import torch

from kvlm.kernels.build import SIMD_PATHS, kernel_status
from kvlm.loading import WEIGHT_FORMATS, resolve_model_path

AUTO = "auto"
WEIGHT_FORMAT_CHOICES = (AUTO, *WEIGHT_FORMATS)


def resolve_weight_format(
    weight_format: str, model: str | Path, device: torch.device, dtype: str = "float32"
) -> str:
    """The concrete format (one of WEIGHT_FORMATS) an engine loads `model` with on `device`.

    An explicit format comes back unchanged. "auto" becomes "gguf" for a GGUF file on the CPU
    in float32 (the kernels compute in float32) when kvlm's SIMD kernels run
    (`kernel_status().path` is avx512 or avx2), and "float" otherwise: another dtype, a
    safetensors folder, a CUDA or MPS device, no C++ compiler, a CPU without AVX2, or
    KVLM_KERNELS=torch / ref. ("float" dequantizes at load: the exact path the
    transformers oracle tests use.) The kernels are built (or loaded) only when the answer
    depends on them.
    """
    if weight_format != AUTO:
        return weight_format
    path = resolve_model_path(str(model))
    if device.type != "cpu" or dtype != "float32" or path.is_dir() or path.suffix != ".gguf":
        return "float"
    return "gguf" if kernel_status().path in SIMD_PATHS else "float"
