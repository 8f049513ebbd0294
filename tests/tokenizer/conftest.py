"""Session fixtures: each tokenizer, ours and the transformers oracle, is built once.

transformers is a test-only oracle: it loads the same GGUF with its own conversion code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvlm.tokenizer import Tokenizer

MODELS = ("smollm2", "gemma3")


def load_oracle(path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def model_paths(smollm2_path: Path, gemma3_path: Path) -> dict[str, Path]:
    return {"smollm2": smollm2_path, "gemma3": gemma3_path}


@pytest.fixture(scope="session")
def our_tokenizers(model_paths: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_gguf(path) for name, path in model_paths.items()}


@pytest.fixture(scope="session")
def oracle_tokenizers(model_paths: dict[str, Path]) -> dict[str, Any]:
    return {name: load_oracle(path) for name, path in model_paths.items()}


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def ours(model: str, our_tokenizers: dict[str, Tokenizer]) -> Tokenizer:
    return our_tokenizers[model]


@pytest.fixture
def oracle(model: str, oracle_tokenizers: dict[str, Any]) -> Any:
    return oracle_tokenizers[model]
