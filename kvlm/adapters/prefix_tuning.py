"""PEFT prefix-tuning adapters: per-layer key/value prefixes read from a saved adapter folder.

PEFT saves a prefix-tuning adapter as `adapter_config.json` plus `adapter_model.safetensors`
holding one tensor, `prompt_embeddings`: [P, num_layers * 2 * token_dim], the prefix encoder's
output for the P virtual tokens (already through the MLP when `prefix_projection` was on).
`PeftModel.get_prompt` views it as [P, num_layers * 2, num_kv_heads, head_dim] (row 2l: layer
l's keys, row 2l + 1: its values) and hands it to transformers as past key values. Checked
against transformers 5.x (tests/oracle/test_prefix_tuning_oracle.py):
- the prefix keys are attended to exactly as stored: never rotated, never normed;
- the prompt's tokens take positions P, P + 1, ... (position ids start at the cache length),
  and the prefix occupies cache places 0 .. P - 1, which sliding windows count.
So a prefix is the first P positions of every sequence of its adapter, with K/V given instead
of computed, and keys stored as they come.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from kvlm.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_KEY = "prompt_embeddings"


class AdapterError(ValueError):
    """An adapter that cannot be read, or does not fit the loaded model."""


@dataclass(frozen=True)
class PrefixTuningAdapter:
    name: str
    path: Path
    keys: torch.Tensor  # [num_layers, P, num_kv_heads, head_dim], as PEFT feeds them
    values: torch.Tensor  # [num_layers, P, num_kv_heads, head_dim]
    digest: str  # of the config and weights: equal digests mean equal K/V

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[1]


def load_prefix_adapter(
    name: str, path: str | Path, config: ModelConfig, dtype: torch.dtype
) -> PrefixTuningAdapter:
    """Read a PEFT prefix-tuning adapter saved for a model shaped like `config`."""
    folder = Path(path)
    peft = _read_config(name, folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"prefix adapter {name!r}: {weights_path} is missing")
    _check_fits(name, peft, config)
    try:
        embeddings = load_file(str(weights_path)).get(WEIGHTS_KEY)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"prefix adapter {name!r}: cannot read {weights_path}: {e}") from e
    num_layers, heads, head_dim = config.num_layers, config.num_kv_heads, config.head_dim
    num_virtual = peft["num_virtual_tokens"]
    expected = (num_virtual, num_layers * 2 * heads * head_dim)
    if embeddings is None or tuple(embeddings.shape) != expected:
        found = "no tensor" if embeddings is None else f"shape {tuple(embeddings.shape)}"
        raise AdapterError(
            f"prefix adapter {name!r}: {weights_path} must hold {WEIGHTS_KEY!r} of shape "
            f"{expected} (virtual tokens, layers x K/V x kv heads x head dim); found {found}"
        )
    kv = embeddings.to(dtype).view(num_virtual, num_layers, 2, heads, head_dim)
    keys = kv[:, :, 0].transpose(0, 1).contiguous()  # [L, P, nkv, hd]
    values = kv[:, :, 1].transpose(0, 1).contiguous()  # [L, P, nkv, hd]
    digest = hashlib.blake2b(digest_size=16)
    digest.update((folder / CONFIG_FILE).read_bytes())
    digest.update(weights_path.read_bytes())
    return PrefixTuningAdapter(name, folder, keys, values, digest.hexdigest())


def _read_config(name: str, folder: Path) -> dict:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(
            f"prefix adapter {name!r}: {config_path} is missing; give the folder PEFT's "
            "save_pretrained wrote (adapter_config.json + adapter_model.safetensors)"
        )
    try:
        peft = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"prefix adapter {name!r}: {config_path} is not JSON: {e}") from e
    if not isinstance(peft, dict) or peft.get("peft_type") != "PREFIX_TUNING":
        kind = peft.get("peft_type") if isinstance(peft, dict) else None
        raise AdapterError(
            f"prefix adapter {name!r} has peft_type {kind!r}: kvlm loads PREFIX_TUNING "
            "adapters only"
        )
    if peft.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(
            f"prefix adapter {name!r} was trained for task_type {peft['task_type']!r}; "
            "kvlm runs CAUSAL_LM adapters"
        )
    if peft.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(
            f"prefix adapter {name!r} has num_transformer_submodules "
            f"{peft['num_transformer_submodules']} (an encoder-decoder adapter); kvlm needs 1"
        )
    num_virtual = peft.get("num_virtual_tokens")
    if not isinstance(num_virtual, int) or num_virtual < 1:
        raise AdapterError(
            f"prefix adapter {name!r}: num_virtual_tokens must be a positive int, "
            f"got {num_virtual!r}"
        )
    return peft


def _check_fits(name: str, peft: dict, config: ModelConfig) -> None:
    """The adapter's layers, KV heads and head size must be the model's."""
    expected = {
        "num_layers": config.num_layers,
        "num_attention_heads": config.num_kv_heads,  # PEFT provisions KV heads (GQA)
        "token_dim": config.num_kv_heads * config.head_dim,
    }
    for key, want in expected.items():
        if peft.get(key) != want:
            raise AdapterError(
                f"prefix adapter {name!r} has {key} {peft.get(key)!r} but the model needs "
                f"{want} ({config.num_layers} layers, {config.num_kv_heads} KV heads of "
                f"{config.head_dim}): it was trained for another model"
            )
