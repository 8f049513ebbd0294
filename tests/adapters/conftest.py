"""Prefix-tuning adapters written in PEFT's saved format, for the engine tests.

The files are what `PeftModel.save_pretrained` writes for a prefix-tuning adapter (the oracle
test, tests/oracle/test_prefix_tuning_oracle.py, uses files PEFT itself saved):
`adapter_config.json` and `adapter_model.safetensors` holding `prompt_embeddings`
[P, num_layers * 2 * num_kv_heads * head_dim] (layer-major, K before V).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvlm.config import ModelConfig
from kvlm.loading.gguf_loader import read_header

MAX_MODEL_LEN = 256


def write_adapter(folder: Path, config: ModelConfig, num_virtual_tokens: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    token_dim = config.num_kv_heads * config.head_dim
    peft_config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "num_layers": config.num_layers,
        "num_attention_heads": config.num_kv_heads,
        "token_dim": token_dim,
        "encoder_hidden_size": token_dim,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(peft_config))
    generator = torch.Generator().manual_seed(seed)
    width = config.num_layers * 2 * token_dim
    embeddings = torch.randn(num_virtual_tokens, width, generator=generator)
    save_file({"prompt_embeddings": embeddings}, str(folder / "adapter_model.safetensors"))
    return folder


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
def smollm2_with_adapters(smollm2_adapter_folders):
    """One smollm2 engine holding both adapters."""
    from kvlm import LLM

    return LLM(
        "smollm2",
        prefix_adapters=smollm2_adapter_folders,
        kv_cache_memory="64MiB",
        max_model_len=MAX_MODEL_LEN,
    )
