"""Rotary position embedding. It lives beside attention because the cache decides positions:
text positions for every key and query, and under attention sinks also each query's place in
the cache (for the sink keys). Positions have no limit: cos/sin come from them each step.

Notation: T = rows (tokens or gathered keys), hd = head dim.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotate-half rope; cos/sin are computed from positions per step (no length-sized table)."""

    def __init__(self, head_dim: int, theta: float, scale: float = 1.0) -> None:
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (theta**exponent) / scale  # [hd / 2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin, [T, 1, hd] float32, for `apply_rope`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd / 2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), -1)[:, None, :], torch.cat((-sin, sin), -1)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]. rotate_half(x) * sin == roll(x, hd/2) * (-sin | sin), exactly."""
    x32 = x.float()
    rolled = torch.roll(x32, x.shape[-1] // 2, dims=-1)
    return (x32 * cos + rolled * signed_sin).to(x.dtype)
