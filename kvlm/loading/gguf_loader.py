"""Read a GGUF file: its header becomes a ModelConfig, its tensors dequantize to one dtype."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from kvlm.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelConfigError
from kvlm.kernels import REPACKABLE, QuantizedTensor, repack_gguf
from kvlm.loading.gguf_file import GGUFFormatError, GGUFTensorInfo, read_gguf, read_tensor_bytes
from kvlm.loading.weights import (
    LoadedModel,
    ModelLoadError,
    rope_row_order,
    unpermute_rope_rows,
)

Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip
# Gemma 3 files carry no layer pattern: like llama.cpp and transformers, every 6th layer is global.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, GGUFTensorInfo]) -> ModelConfig:
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
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        max_model_len=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10_000.0)),
        tie_word_embeddings="output.weight" not in tensors,
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


def dequantize(path: Path, info: GGUFTensorInfo) -> torch.Tensor:
    """One GGUF tensor as float32 in PyTorch layout."""
    qtype = info.tensor_type
    if qtype not in SUPPORTED_TENSOR_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
        raise ModelLoadError(
            f"tensor {info.name!r} has type {qtype.name}; kvlm dequantizes {names}"
        )
    raw = read_tensor_bytes(path, info)  # [rows, bytes per row] uint8
    if qtype == Q.Q8_0:
        # Each block: a float16 scale then 32 int8 values; done in torch, ~10x numpy's speed.
        blocks = torch.from_numpy(raw).view(-1, 34)  # [num_blocks, 34] uint8
        scale = blocks[:, :2].view(torch.float16).float()  # [num_blocks, 1]
        values = blocks[:, 2:].view(torch.int8).float()  # [num_blocks, 32]
        return (values * scale).reshape(info.shape)
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        return torch.from_numpy(raw.view(dtype)).float().reshape(info.shape)
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(info.shape)


def load_quantized(path: Path, info: GGUFTensorInfo, rope_heads: int | None) -> QuantizedTensor:
    """One quantized GGUF matrix repacked for the kernels, bytes to blocks with no float detour;
    `rope_heads` undoes llama.cpp's q/k row permutation (rows move whole)."""
    plain = repack_gguf(read_tensor_bytes(path, info), info.tensor_type, info.shape)
    if rope_heads is not None:
        plain = plain.permute_rows(rope_row_order(info.shape[0], rope_heads))
    return QuantizedTensor.from_plain(plain)


def read_header(path: Path) -> tuple[ModelConfig, list[GGUFTensorInfo]]:
    """A GGUF file's config and tensor descriptions: no tensor data, no vocabulary."""
    try:
        # The vocabulary is the tokenizer's business; only scalar tokenizer ids are read here.
        contents = read_gguf(
            path, lambda key: not key.startswith("tokenizer.ggml.") or key.endswith("_id")
        )
    except GGUFFormatError as e:
        raise ModelLoadError(f"{e} (corrupt or truncated?)") from e
    tensors = {info.name: info for info in contents.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor: not a language model file")
    return config_from_metadata(contents.metadata, tensors), list(contents.tensors)


def load_gguf(path: Path, dtype: torch.dtype, weight_format: str = "float") -> LoadedModel:
    """`weight_format` "float" dequantizes every tensor to `dtype`; any other keeps the file's
    quantized matrices quantized (see weights.WEIGHT_FORMATS)."""
    config, infos = read_header(path)
    weights: dict[str, torch.Tensor] = {}
    for info in infos:
        rope_heads = None
        if config.architecture == "llama" and info.name.endswith("attn_q.weight"):
            rope_heads = config.num_heads
        elif config.architecture == "llama" and info.name.endswith("attn_k.weight"):
            rope_heads = config.num_kv_heads
        try:
            if weight_format != "float" and info.tensor_type in REPACKABLE:
                weights[info.name] = load_quantized(path, info, rope_heads)
                continue
            w = dequantize(path, info)
        except GGUFFormatError as e:
            raise ModelLoadError(f"{e} (corrupt or truncated?)") from e
        if rope_heads is not None:
            w = unpermute_rope_rows(w, rope_heads)
        weights[info.name] = w.to(dtype)
    return LoadedModel(config=config, weights=weights, source=str(path))
