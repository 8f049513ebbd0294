"""Well-known architectures as `ModelConfig`s, for sizing their KV cache without their weights.

Each preset is transcribed from the model's published Hugging Face `config.json` (the values
are cited beside each one). kvlm cannot run these (no weights here, and Llama 3.1's rope
scaling is not modelled); they exist for `kvlm memory`, where only the shapes matter: layers,
KV heads, head_dim, windows and the maximum context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvlm.config import ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    dtype: str  # the published `torch_dtype`: what an "auto" KV cache holds for this preset
    source: str  # the Hugging Face repository whose config.json the numbers come from


def _llama(**kwargs: Any) -> ModelConfig:
    return ModelConfig(architecture="llama", tie_word_embeddings=False, **kwargs)


def _gemma3(window: int, pattern: int, **kwargs: Any) -> ModelConfig:
    """Gemma 3: every `pattern`-th layer is global, the others see the last `window` tokens."""
    num_layers = kwargs["num_layers"]
    return ModelConfig(
        architecture="gemma3",
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
        rms_norm_eps=1e-6,
        sliding_windows=tuple(
            None if (i + 1) % pattern == 0 else window for i in range(num_layers)
        ),
        hidden_act="gelu_tanh",
        embedding_scale=math.sqrt(kwargs["hidden_size"]),
        use_qk_norm=True,
        use_sandwich_norm=True,
        bos_token_id=2,
        eos_token_ids=(1,),
        **kwargs,
    )


_PRESETS = (
    # meta-llama/Llama-2-7b-hf: hidden_size 4096, intermediate_size 11008, 32 layers,
    # 32 attention heads, 32 KV heads (plain multi-head), max_position_embeddings 4096,
    # rms_norm_eps 1e-5, rope_theta 10000, vocab_size 32000, torch_dtype float16.
    Preset(
        "llama-2-7b",
        _llama(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            head_dim=128,
            max_model_len=4096,
            rms_norm_eps=1e-5,
            rope_theta=10_000.0,
            bos_token_id=1,
            eos_token_ids=(2,),
        ),
        dtype="float16",
        source="meta-llama/Llama-2-7b-hf",
    ),
    # meta-llama/Meta-Llama-3-8B: hidden_size 4096, intermediate_size 14336, 32 layers,
    # 32 heads, 8 KV heads (GQA 4:1), max_position_embeddings 8192, rms_norm_eps 1e-5,
    # rope_theta 500000, vocab_size 128256, torch_dtype bfloat16.
    Preset(
        "llama-3-8b",
        _llama(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            max_model_len=8192,
            rms_norm_eps=1e-5,
            rope_theta=500_000.0,
            bos_token_id=128000,
            eos_token_ids=(128001,),
        ),
        dtype="bfloat16",
        source="meta-llama/Meta-Llama-3-8B",
    ),
    # meta-llama/Llama-3.1-8B: Llama 3 8B's shapes with max_position_embeddings 131072
    # (rope_scaling llama3, factor 8, original 8192).
    Preset(
        "llama-3.1-8b",
        _llama(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            max_model_len=131072,
            rms_norm_eps=1e-5,
            rope_theta=500_000.0,
            bos_token_id=128000,
            eos_token_ids=(128001,),
        ),
        dtype="bfloat16",
        source="meta-llama/Llama-3.1-8B",
    ),
    # meta-llama/Meta-Llama-3-70B: hidden_size 8192, intermediate_size 28672, 80 layers,
    # 64 heads, 8 KV heads (GQA 8:1), max_position_embeddings 8192, rms_norm_eps 1e-5,
    # rope_theta 500000, vocab_size 128256, torch_dtype bfloat16.
    Preset(
        "llama-3-70b",
        _llama(
            vocab_size=128256,
            hidden_size=8192,
            intermediate_size=28672,
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            head_dim=128,
            max_model_len=8192,
            rms_norm_eps=1e-5,
            rope_theta=500_000.0,
            bos_token_id=128000,
            eos_token_ids=(128001,),
        ),
        dtype="bfloat16",
        source="meta-llama/Meta-Llama-3-70B",
    ),
    # meta-llama/Llama-3.1-70B: Llama 3 70B's shapes with max_position_embeddings 131072
    # (rope_scaling llama3, factor 8, original 8192).
    Preset(
        "llama-3.1-70b",
        _llama(
            vocab_size=128256,
            hidden_size=8192,
            intermediate_size=28672,
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            head_dim=128,
            max_model_len=131072,
            rms_norm_eps=1e-5,
            rope_theta=500_000.0,
            bos_token_id=128000,
            eos_token_ids=(128001,),
        ),
        dtype="bfloat16",
        source="meta-llama/Llama-3.1-70B",
    ),
    # mistralai/Mistral-7B-v0.1: hidden_size 4096, intermediate_size 14336, 32 layers,
    # 32 heads, 8 KV heads, sliding_window 4096 on every layer, max_position_embeddings 32768,
    # rms_norm_eps 1e-5, rope_theta 10000, vocab_size 32000, torch_dtype bfloat16.
    # (v0.2 and later drop the window: pass --sliding-window yourself to compare.)
    Preset(
        "mistral-7b",
        _llama(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            max_model_len=32768,
            rms_norm_eps=1e-5,
            rope_theta=10_000.0,
            sliding_windows=(4096,) * 32,
            bos_token_id=1,
            eos_token_ids=(2,),
        ),
        dtype="bfloat16",
        source="mistralai/Mistral-7B-v0.1",
    ),
    # google/gemma-3-270m: hidden_size 640, intermediate_size 2048, 18 layers, 4 heads,
    # 1 KV head (MQA), head_dim 256, query_pre_attn_scalar 256, sliding_window 512 with
    # layer_types "full_attention" every 6th layer, max_position_embeddings 32768,
    # vocab_size 262144, torch_dtype bfloat16.
    Preset(
        "gemma-3-270m",
        _gemma3(
            window=512,
            pattern=6,
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_layers=18,
            num_heads=4,
            num_kv_heads=1,
            head_dim=256,
            max_model_len=32768,
            query_pre_attn_scalar=256,
        ),
        dtype="bfloat16",
        source="google/gemma-3-270m",
    ),
    # google/gemma-3-27b-pt, text_config: hidden_size 5376, intermediate_size 21504,
    # 62 layers, 32 heads, 16 KV heads, head_dim 128, query_pre_attn_scalar 168,
    # sliding_window 1024, sliding_window_pattern 6, max_position_embeddings 131072,
    # rope_scaling linear factor 8, vocab_size 262208, torch_dtype bfloat16.
    Preset(
        "gemma-3-27b",
        _gemma3(
            window=1024,
            pattern=6,
            vocab_size=262208,
            hidden_size=5376,
            intermediate_size=21504,
            num_layers=62,
            num_heads=32,
            num_kv_heads=16,
            head_dim=128,
            max_model_len=131072,
            query_pre_attn_scalar=168,
            rope_scaling_factor=8.0,
        ),
        dtype="bfloat16",
        source="google/gemma-3-27b-pt",
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct: hidden_size 576, intermediate_size 1536, 30 layers,
    # 9 heads, 3 KV heads (GQA 3:1), head_dim 64, max_position_embeddings 8192,
    # rms_norm_eps 1e-5, rope_theta 100000, tied embeddings, vocab_size 49152,
    # torch_dtype bfloat16. (The `smollm2` alias is this model as a Q4_1 GGUF.)
    Preset(
        "smollm2-135m",
        ModelConfig(
            architecture="llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            max_model_len=8192,
            rms_norm_eps=1e-5,
            rope_theta=100_000.0,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_ids=(2,),
        ),
        dtype="bfloat16",
        source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
)

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def same_kv_layout(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two configs cache exactly the same K/V per token (layers, heads, windows)."""
    return (a.num_layers, a.num_kv_heads, a.head_dim, a.sliding_windows) == (
        b.num_layers,
        b.num_kv_heads,
        b.head_dim,
        b.sliding_windows,
    )
