"""A model's shape without its weights: a preset, an alias, a GGUF header or a config.json.

What `kvlm memory` and the memory benchmark size a KV cache from; it answers in well under a
second for a 70B model, since no tensor is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvlm.config import ModelConfig
from kvlm.loading.gguf_loader import read_header
from kvlm.loading.hf_loader import config_from_hf
from kvlm.loading.registry import ALIASES, ModelNotFoundError, resolve_model_path
from kvlm.loading.weights import ModelLoadError
from kvlm.presets import PRESETS

# "auto" for a file is what kvlm runs it in by default (`--dtype float32`); for a preset it is
# the published torch_dtype, what the model is usually served in.
FILE_AUTO_DTYPE = "float32"


@dataclass(frozen=True)
class ModelShape:
    name: str
    config: ModelConfig
    kind: str  # "preset" | "gguf" | "hf"
    source: str  # the preset's repository or the file's path
    auto_dtype: str  # what --kv-cache-dtype auto means for this model


def read_model_shape(name: str) -> ModelShape:
    """A preset, an alias, a .gguf file (header only) or a HF folder (config.json only)."""
    if name in PRESETS:
        preset = PRESETS[name]
        return ModelShape(name, preset.config, "preset", preset.source, preset.dtype)
    try:
        path = resolve_model_path(name)
    except ModelNotFoundError:
        if name in ALIASES:
            raise  # the alias's package is missing: its own message says what to install
        raise ModelNotFoundError(
            f"model {name!r} not found: it is not a preset ({', '.join(PRESETS)}), not an "
            f"alias ({', '.join(sorted(ALIASES))}), and not an existing .gguf file or folder"
        ) from None
    if path.is_dir():
        return ModelShape(name, _hf_config(path), "hf", str(path), FILE_AUTO_DTYPE)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    return ModelShape(name, read_header(path)[0], "gguf", str(path), FILE_AUTO_DTYPE)


def _hf_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder: it has no config.json")
    try:
        return config_from_hf(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"{config_file} is malformed: {e}") from e
