"""Fixtures and helpers of the fused decode tests: each GGUF model is loaded once per session.

Every test here needs the AVX2 (or AVX-512) kernels; `needs_simd` skips a module without them.
"""

from __future__ import annotations

import types

import pytest
import torch

from kvlm import LLM, SamplingParams
from kvlm.engine.fused_decode import FusedDecoder
from kvlm.kernels import available_paths
from kvlm.models.layers import RMSNorm
from kvlm.models.transformer import CausalLM, DecoderLayer

SIMD_PATHS = [p for p in ("avx512", "avx2") if p in available_paths()]
needs_simd = pytest.mark.skipif(not SIMD_PATHS, reason="fused decode needs the AVX2 kernels")
PROMPTS = [  # ragged: 6, 13 and 1 tokens in SmolLM2's tokenizer
    "The history of the printing press",
    "def fibonacci(n):\n    if n < 2:",
    "Hi",
]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture(scope="session")
def smollm2_gguf() -> LLM:
    return LLM("smollm2", weight_format="gguf")


@pytest.fixture(scope="session")
def gemma3_gguf() -> LLM:
    return LLM("gemma3-270m", weight_format="gguf")


def unit_norm(model: CausalLM) -> RMSNorm:
    return RMSNorm(torch.ones(model.config.hidden_size), model.config.rms_norm_eps)


def one_layer_plan(model: CausalLM, layer: DecoderLayer, path: str | None) -> FusedDecoder:
    """A FusedDecoder of `layer` alone whose final norm has unit weight."""
    rope_key = layer.rope_key
    one_layer = types.SimpleNamespace(
        config=model.config,
        ropes={rope_key: model.ropes[rope_key]},
        layers=[layer],
        norm=unit_norm(model),
    )
    return FusedDecoder(one_layer, path)  # type: ignore[arg-type]
