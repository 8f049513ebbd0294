"""Read a Hugging Face folder: config.json plus *.safetensors, renamed to canonical names."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from kvlm.config import ModelConfig, ModelConfigError
from kvlm.loading.weights import LoadedModel, ModelLoadError

HF_MODEL_TYPES = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
# Hugging Face per-layer names -> GGUF's, which kvlm uses throughout.
_LAYER_RENAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_RENAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _canonical_name(name: str, architecture: str) -> str | None:
    for prefix in ("language_model.", "model."):
        name = name.removeprefix(prefix)
    if m := _LAYER_RE.match(name):
        layer, module, kind = m.groups()
        if module == "post_attention_layernorm":
            # Llama's norm before the MLP; Gemma's norm after attention (it has its own pre-MLP).
            target = "ffn_norm" if architecture == "llama" else "post_attention_norm"
        else:
            target = _LAYER_RENAMES.get(module)
        return None if target is None else f"blk.{layer}.{target}.{kind}"
    module, _, kind = name.rpartition(".")
    return f"{_GLOBAL_RENAMES[module]}.{kind}" if module in _GLOBAL_RENAMES else None


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    cfg = cfg.get("text_config", cfg) if cfg.get("model_type") == "gemma3" else cfg
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ModelConfigError(
            f"unsupported model_type {model_type!r}; kvlm runs {', '.join(HF_MODEL_TYPES)}"
        )
    arch = HF_MODEL_TYPES[model_type]
    hidden, num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    rope = cfg.get("rope_parameters") or {}
    common = dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        max_model_len=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        tie_word_embeddings=cfg.get("tie_word_embeddings", arch == "gemma3"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
    if arch == "llama":
        theta = cfg.get("rope_theta") or rope.get("rope_theta", 10_000.0)
        return ModelConfig(**common, rope_theta=float(theta))
    return _gemma3_config(cfg, common, rope)


def _gemma3_config(cfg: dict[str, Any], common: dict[str, Any], rope: dict) -> ModelConfig:
    window = cfg.get("sliding_window", 4096)
    pattern = cfg.get("sliding_window_pattern", 6)
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention"
        for i in range(common["num_layers"])
    ]
    # transformers 5 nests rope bases per layer type; older configs keep flat keys.
    full = rope.get("full_attention", rope)
    local = rope.get("sliding_attention", {})
    scaling = cfg.get("rope_scaling") or full
    return ModelConfig(
        **common,
        rope_theta=float(cfg.get("rope_theta") or full.get("rope_theta", 1_000_000.0)),
        rope_local_theta=float(
            cfg.get("rope_local_base_freq") or local.get("rope_theta", 10_000.0)
        ),
        rope_scaling_factor=float(scaling.get("factor", 1.0))
        if scaling.get("rope_type", "default") == "linear"
        else 1.0,
        sliding_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        hidden_act="gelu_tanh",
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
        embedding_scale=math.sqrt(common["hidden_size"]),
        use_qk_norm=True,
        use_sandwich_norm=True,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
    )


def load_hf_folder(path: Path, dtype: torch.dtype) -> LoadedModel:
    config_file = path / "config.json"
    files = sorted(path.glob("*.safetensors"))
    if not config_file.exists() or not files:
        raise ModelLoadError(
            f"{path} is not a Hugging Face model folder: it needs config.json and *.safetensors"
        )
    try:
        config = config_from_hf(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"{config_file} is malformed: {e}") from e
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{file} is not a readable safetensors file: {e}") from e
        for name, tensor in tensors.items():
            canonical = _canonical_name(name, config.architecture)
            if canonical is None:
                continue
            tensor = tensor.float()
            if config.architecture == "gemma3" and canonical.endswith("norm.weight"):
                tensor = tensor + 1.0  # Gemma's RMSNorm scales by (1 + w)
            weights[canonical] = tensor.to(dtype)
    if config.tie_word_embeddings:
        weights.pop("output.weight", None)
    return LoadedModel(config=config, weights=weights, source=str(path))
