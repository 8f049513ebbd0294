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
