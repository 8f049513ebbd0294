"""Model loading: aliases, GGUF files and Hugging Face folders, all to one LoadedModel."""

from __future__ import annotations

import torch

from kvlm.loading.gguf_loader import load_gguf
from kvlm.loading.hf_loader import load_hf_folder
from kvlm.loading.quantize import LOAD_QUANTIZATIONS, quantize_float_matrices
from kvlm.loading.registry import ALIASES, DEFAULT_MODEL, ModelNotFoundError, resolve_model_path
from kvlm.loading.weights import WEIGHT_FORMATS, LoadedModel, ModelLoadError

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelLoadError",
    "ModelNotFoundError",
    "WEIGHT_FORMATS",
    "load_model",
    "resolve_model_path",
]


def load_model(
    name: str, dtype: torch.dtype = torch.float32, weight_format: str = "float"
) -> LoadedModel:
    """Load an alias, a `.gguf` file or a safetensors folder; float weights come out in `dtype`.

    `weight_format` (one of WEIGHT_FORMATS): "float" dequantizes every tensor to `dtype`;
    "gguf" keeps a GGUF file's quantized matrices quantized (QuantizedTensor, for kvlm's
    kernels); "q8_0" / "q4_1" also quantize float matrices (safetensors folders) at load.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ModelLoadError(
            f"weight_format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}"
        )
    path = resolve_model_path(name)
    if path.is_dir():
        loaded = load_hf_folder(path, dtype)
    elif path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    else:
        loaded = load_gguf(path, dtype, weight_format)
    if weight_format in LOAD_QUANTIZATIONS:
        quantize_float_matrices(loaded.weights, weight_format)
    return loaded
