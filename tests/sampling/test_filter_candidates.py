"""The top-k pre-filter gives exactly the full sort's answer, and is taken when it can be."""

from __future__ import annotations

import pytest
import torch

from kvlm.sampling import filters
from kvlm.sampling.filters import _filter_candidates, _filter_sorted, apply_top_k_top_p_min_p

VOCAB = 4 * filters.CANDIDATES  # large enough for the pre-filter to apply


def _params(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: neutral, a small top-k, a top-k wider than the candidates, top-p, min-p."""
    g = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, 5, (rows,), generator=g)
    top_k = torch.full((rows,), VOCAB)
    top_k[choice == 1] = torch.randint(1, 64, ((choice == 1).sum(),), generator=g)
    top_k[choice == 2] = filters.CANDIDATES + 500
    top_p = torch.where(choice == 3, torch.rand(rows, generator=g) * 0.9 + 0.05, 1.0)
    min_p = torch.where(choice == 4, torch.rand(rows, generator=g) * 0.3, 0.0)
    return top_k, top_p, min_p


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [2.0, 8.0])
def test_equals_the_full_sort(seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(24, VOCAB, generator=g) * scale
    logits[::3] = (logits[::3] * 2).round() / 2  # many ties, also at the candidates' edge
    top_k, top_p, min_p = _params(24, seed)
    _, unsettled = _filter_candidates(logits, top_k, top_p, min_p)
    assert unsettled is not None and not unsettled.all()  # both paths are exercised
    expected = _filter_sorted(logits, top_k, top_p, min_p)
    assert torch.equal(apply_top_k_top_p_min_p(logits, top_k, top_p, min_p), expected)


def test_peaked_rows_skip_the_full_sort() -> None:
    """Language-model-like logits: the nucleus is a few tokens, so the pre-filter settles
    every row (the test would prove nothing if it always fell back)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, VOCAB, generator=g) * 8
    top_p = torch.full((16,), 0.95)
    min_p = torch.full((16,), 0.05)
    top_k = torch.tensor([40] * 8 + [VOCAB] * 8)
    fast, unsettled = _filter_candidates(logits, top_k, top_p, min_p)
    assert unsettled is None
    assert torch.equal(fast, _filter_sorted(logits, top_k, top_p, min_p))
    assert ((fast > float("-inf")).sum(dim=-1) < filters.CANDIDATES).all()


def test_flat_rows_fall_back() -> None:
    """A nucleus wider than the candidates cannot be settled among them; only its row is
    sorted."""
    logits = torch.zeros(2, VOCAB)
    logits[:, 0] = 12.0
    top_p = torch.tensor([0.99, 0.5])
    _, unsettled = _filter_candidates(logits, None, top_p, None)
    assert unsettled is not None and unsettled.tolist() == [True, False]
    filtered = apply_top_k_top_p_min_p(logits, None, top_p, None)
    assert torch.equal(filtered, _filter_sorted(logits, None, top_p, None))
    assert (filtered[0] > float("-inf")).sum() > filters.CANDIDATES
