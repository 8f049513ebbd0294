"""Fixtures and helpers of the fused decode tests: each GGUF model is loaded once per session;
`record_steps` says which path (fused plan or torch layers) ran each step.

Every test here needs the AVX2 (or AVX-512) kernels; `needs_simd` skips a module without them.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from kvlm import LLM, SamplingParams
from kvlm.attention.context import ForwardContext
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


@dataclass
class StepRecord:
    query_lens: list[int]  # new tokens of each sequence
    fused: int = 0  # FusedDecoder calls in the step
    torch_layers: int = 0  # decoder layers run on the torch path


@contextmanager
def record_steps(model: CausalLM, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[StepRecord]]:
    """One StepRecord per model forward: the step's shape and which path ran it."""
    steps: list[StepRecord] = []
    fused_call = FusedDecoder.__call__

    def counted(self: FusedDecoder, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        steps[-1].fused += 1
        return fused_call(self, x, ctx)

    def on_forward(module: CausalLM, args: tuple) -> None:
        _, ctx = args
        query_start = ctx.layer_views[0].query_start  # [B + 1] (these engines have a cache)
        steps.append(StepRecord(query_start.diff().tolist()))

    def on_layer(module: DecoderLayer, args: tuple) -> None:
        steps[-1].torch_layers += 1

    monkeypatch.setattr(FusedDecoder, "__call__", counted)
    handles = [model.register_forward_pre_hook(on_forward)]
    handles += [layer.register_forward_pre_hook(on_layer) for layer in model.layers]
    try:
        yield steps
    finally:
        for handle in handles:
            handle.remove()
