"""Prefix-tuning adapters written in PEFT's saved format (`peft_adapters.write_adapter`) for
the engine tests; the oracle test uses files PEFT itself saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from peft_adapters import write_adapter

from kvlm.config import ModelConfig
from kvlm.loading.gguf_loader import read_header


@pytest.fixture(scope="session")
def smollm2_config(smollm2_path) -> ModelConfig:
    return read_header(smollm2_path)[0]


@pytest.fixture(scope="session")
def gemma3_config(gemma3_path) -> ModelConfig:
    return read_header(gemma3_path)[0]


@pytest.fixture(scope="session")
def smollm2_adapter_folders(smollm2_config, tmp_path_factory) -> dict[str, Path]:
    """20 virtual tokens (a full block and a partial one) and 16 (exactly one block)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "twenty": write_adapter(root / "twenty", smollm2_config, 20, seed=1),
        "sixteen": write_adapter(root / "sixteen", smollm2_config, 16, seed=2),
    }


@pytest.fixture(scope="session")
def smollm2_adapter_settings(smollm2_adapter_folders) -> dict[str, Any]:
    """LLM settings with both adapters and a short context (so small pools still fit)."""
    return {"prefix_adapters": smollm2_adapter_folders, "max_model_len": 256}


@pytest.fixture(scope="session")
def smollm2_with_adapters(smollm2_adapter_settings):
    """One smollm2 engine holding both adapters, on float weights: its tests hold a batch to
    each prompt alone, and on gguf weights a batched step can round a near-tie the other way."""
    from kvlm import LLM

    return LLM(
        "smollm2", kv_cache_memory="64MiB", weight_format="float", **smollm2_adapter_settings
    )
