"""What every loader returns: a config plus weights under kvlm's canonical tensor names.

Canonical names follow GGUF's (`token_embd.weight`, `blk.{i}.attn_q.weight`, ...), with every
tensor in PyTorch layout (`[out_features, in_features]` for linear weights) and already in the
form the model multiplies by: RMSNorm weights are the full scale (Gemma's `1 + w` folded in) and
Llama's q/k rows are in Hugging Face order (rotate-half rope), whatever the file stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlm.config import ModelConfig

# "float": every tensor dequantized to the load dtype (the exact path the oracle tests use).
# "gguf": GGUF's quantized matrices stay quantized for kvlm's kernels (QuantizedTensor).
# "q8_0" / "q4_1": as "gguf", and float matrices (safetensors, F16/F32 GGUF tensors) are
# quantized to that GGUF type at load.
WEIGHT_FORMATS = ("float", "gguf", "q8_0", "q4_1")


class ModelLoadError(ValueError):
    """A model file is unreadable, truncated, or holds something kvlm cannot run."""


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    source: str  # the file or folder the weights came from

    def take(self, name: str) -> torch.Tensor:
        """Remove and return one tensor; a missing one is a load error naming it."""
        try:
            return self.weights.pop(name)
        except KeyError:
            raise ModelLoadError(f"{self.source}: missing tensor {name!r}") from None


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved-pair rope) to rotate-half order.

    Within each head llama.cpp stores rows as (pair, 2) interleaved; Hugging Face stores them
    as (2, pair). weight: [num_heads * head_dim, in_features].
    """
    out_features, in_features = weight.shape
    half = out_features // num_heads // 2
    return weight.view(num_heads, half, 2, in_features).transpose(1, 2).reshape(weight.shape)


def rope_row_order(out_features: int, num_heads: int) -> torch.Tensor:
    """The same permutation as row indices: unpermute_rope_rows(w, h) == w[rope_row_order(.., h)]
    (for quantized rows, which move as whole rows)."""
    half = out_features // num_heads // 2
    return torch.arange(out_features).view(num_heads, half, 2).transpose(1, 2).reshape(-1)
