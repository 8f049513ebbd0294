"""Prefix-tuning adapters for tests: saved by PEFT itself, or written in its saved format; and
the reference PEFT + transformers give.

The reference is a greedy loop of full forward passes through the `PeftModel` (with
transformers 5.x / peft 0.21, `PeftModel.generate()` was seen to drop the prefix and return
the base model's tokens, while its forward pass keeps it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvlm.config import ModelConfig


def save_prefix_adapter(
    hf_model, folder: Path, num_virtual_tokens: int, seed: int, prefix_projection: bool = False
):
    """Wrap `hf_model` in a fresh prefix-tuning PeftModel (PEFT initialises the prefix with
    seeded noise, so it changes the model's tokens), save it to `folder`, return it. With
    `prefix_projection` PEFT saves the MLP's output, the K/V themselves."""
    import peft

    torch.manual_seed(seed)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
    )
    model = peft.get_peft_model(hf_model, config).eval()
    model.save_pretrained(str(folder))
    return model


def greedy_forward(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens from full forward passes, nothing cached between steps."""
    sequence = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(num_tokens):
            ids = torch.tensor([sequence])
            mask = torch.ones_like(ids)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
            sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(prompt_ids) :]


def write_adapter(folder: Path, config: ModelConfig, num_virtual_tokens: int, seed: int) -> Path:
    """What `PeftModel.save_pretrained` writes for a prefix-tuning adapter without projection:
    `adapter_config.json`, and `adapter_model.safetensors` holding `prompt_embeddings`
    [P, num_layers * 2 * num_kv_heads * head_dim] (layer-major, K before V), here seeded noise."""
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
