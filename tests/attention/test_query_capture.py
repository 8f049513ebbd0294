"""`QueryCapture`: the rows a press reads, rotated as the press asks: at their own positions
(exactly what attention applies) or by the mean rope of a span of positions (the mean of the
query rotated at each of them), times the scale."""

from __future__ import annotations

import math

import numpy as np
import torch

from kvlm.attention.context import QueryCapture
from kvlm.attention.rope import RotaryEmbedding, apply_rope


def test_rows_are_rotated_at_their_position_or_by_the_mean_rope_of_a_span() -> None:
    torch.manual_seed(0)
    hd, scale = 8, 1 / math.sqrt(8)
    rope = RotaryEmbedding(hd, theta=10_000.0)
    q = torch.randn(6, 3, hd)  # [T, nh, hd] before rope
    rows = torch.tensor([1, 2, 4, 5])
    starts, counts = np.array([7, 8, 40, 40]), np.array([1, 1, 32, 32])
    capture = QueryCapture(rows, starts, counts)
    capture.add(0, q, rope, scale)
    capture.add(1, 2 * q, rope, scale)  # the tables are computed once per rope and reused
    got = capture.queries[0]
    own = apply_rope(q[[1, 2]], *rope.cos_sin(torch.tensor([7, 8]))) * scale
    assert torch.equal(got[:2], own)
    rotated = [apply_rope(q[[4, 5]], *rope.cos_sin(torch.tensor([t] * 2))) for t in range(40, 72)]
    assert torch.allclose(got[2:], torch.stack(rotated).mean(dim=0) * scale, atol=1e-6)
    assert torch.allclose(capture.queries[1], 2 * got, atol=1e-6)
