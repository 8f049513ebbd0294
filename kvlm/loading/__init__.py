"""Model loading: aliases, GGUF files and Hugging Face folders, all to one LoadedModel."""

from __future__ import annotations

import torch

from kvlm.loading.gguf_loader import load_gguf
from kvlm.loading.hf_loader import load_hf_folder
from kvlm.loading.registry import ALIASES, DEFAULT_MODEL, ModelNotFoundError, resolve_model_path
from kvlm.loading.weights import LoadedModel, ModelLoadError

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelLoadError",
    "ModelNotFoundError",
    "load_model",
    "resolve_model_path",
]


def load_model(
    name: str, dtype: torch.dtype = torch.float32, weight_format: str = "float"
) -> LoadedModel:
    """Load an alias, a `.gguf` file or a safetensors folder; weights come out in `dtype`.

    `weight_format` "float" dequantizes every tensor to `dtype` at load.
    """
    path = resolve_model_path(name)
    if path.is_dir():
        return load_hf_folder(path, dtype)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    return load_gguf(path, dtype)
