"""Read a GGUF file: its header becomes a ModelConfig, its tensors dequantize to one dtype."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from kvlm.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelConfigError
from kvlm.loading.weights import LoadedModel, ModelLoadError, unpermute_rope_rows

Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip
# Gemma 3 files carry no layer pattern: like llama.cpp and transformers, every 6th layer is global.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning the reader's low-level failures into one clear error."""
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ...
        raise ModelLoadError(
            f"{path} is not a readable GGUF file (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from e


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Scalar and string fields by key; array fields become their length (vocabularies are big)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key] = len(field.data)
        else:
            meta[key] = field.contents()
    return meta


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"unsupported architecture {arch!r}; kvlm runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF header lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    num_layers = int(get("block_count"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    common = dict(
        architecture=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size") or meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        max_model_len=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10_000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    if arch == "llama":
        return ModelConfig(**common)
    window = int(get("attention.sliding_window"))
    softcap = meta.get(f"{arch}.final_logit_softcapping")
    scaling = meta.get(f"{arch}.rope.scaling.factor")
    return ModelConfig(
        **common,
        rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
        rope_scaling_factor=float(scaling) if scaling else 1.0,
        sliding_windows=tuple(
            None if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else window for i in range(num_layers)
        ),
        hidden_act="gelu_tanh",
        embedding_scale=math.sqrt(hidden),
        use_qk_norm=True,
        use_sandwich_norm=True,
        final_logit_softcapping=float(softcap) if softcap else None,
        attn_logit_softcapping=meta.get(f"{arch}.attn_logit_softcapping"),
    )


def dequantize(tensor: Any) -> torch.Tensor:
    """One GGUF tensor as float32 in PyTorch layout (GGUF lists dims innermost first)."""
    qtype = tensor.tensor_type
    if qtype not in SUPPORTED_TENSOR_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
        raise ModelLoadError(
            f"tensor {tensor.name!r} has type {qtype.name}; kvlm dequantizes {names}"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape))
    raw = np.asarray(tensor.data)
    if qtype == Q.Q8_0:
        # Each block: a float16 scale then 32 int8 values; done in torch, ~10x numpy's speed.
        blocks = torch.from_numpy(raw.reshape(-1, 34).copy())  # [num_blocks, 34] uint8
        scale = blocks[:, :2].view(torch.float16).float()  # [num_blocks, 1]
        values = blocks[:, 2:].view(torch.int8).float()  # [num_blocks, 32]
        return (values * scale).reshape(shape)
    if qtype in (Q.F32, Q.F16):
        return torch.from_numpy(raw.copy()).float().reshape(shape)
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(shape)


def load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    reader = open_gguf(path)
    names = {t.name for t in reader.tensors}
    config = config_from_metadata(read_metadata(reader), names)
    weights: dict[str, torch.Tensor] = {}
    try:
        for tensor in reader.tensors:
            w = dequantize(tensor)
            if config.architecture == "llama" and tensor.name.endswith("attn_q.weight"):
                w = unpermute_rope_rows(w, config.num_heads)
            elif config.architecture == "llama" and tensor.name.endswith("attn_k.weight"):
                w = unpermute_rope_rows(w, config.num_kv_heads)
            weights[tensor.name] = w.to(dtype)
    except (ValueError, IndexError, RuntimeError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: tensor data is corrupt or truncated: {e}") from e
    return LoadedModel(config=config, weights=weights, source=str(path))
