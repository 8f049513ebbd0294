"""kvlm::apply_token_bitmask_ (a grammar's packed mask on some logits rows) gives the torch
reference's answer, and touches no other row."""

from __future__ import annotations

import pytest
import torch

from kvlm.kernels import available_paths
from kvlm.kernels.bitmask import apply_token_bitmask_, apply_token_bitmask_reference_

pytestmark = pytest.mark.skipif(
    available_paths() == ("torch",), reason="the C++ kernels did not build here"
)


def _bitmask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Random words, with all-allowed and all-banned words mixed in: [rows, words] int32."""
    g = torch.Generator().manual_seed(seed)
    words = (vocab + 31) // 32
    bits = torch.randint(-(2**31), 2**31, (rows, words), dtype=torch.int64, generator=g)
    kind = torch.randint(0, 3, (rows, words), generator=g)
    bits[kind == 1] = -1  # every token of the word allowed
    bits[kind == 2] = 0  # none
    return bits.to(torch.int32)


@pytest.mark.parametrize(("num_seqs", "vocab"), [(1, 1), (3, 31), (4, 32), (5, 33), (16, 49152)])
def test_kernel_matches_the_reference_on_the_masked_rows_only(num_seqs: int, vocab: int) -> None:
    logits = torch.randn(num_seqs, vocab, generator=torch.Generator().manual_seed(vocab))
    rows = list(range(num_seqs - 1, -1, -2))  # descending, every other row
    bitmask = _bitmask(len(rows), vocab, seed=num_seqs)
    expected = logits.clone()
    apply_token_bitmask_reference_(expected, bitmask, rows)
    got = logits.clone()
    torch.ops.kvlm.apply_token_bitmask_(got, bitmask, rows)
    assert torch.equal(got, expected)
    others = [r for r in range(num_seqs) if r not in rows]
    assert torch.equal(got[others], logits[others])
    for i, row in enumerate(rows):  # the reference itself, token by token
        allowed = [(int(bitmask[i, t // 32]) >> (t % 32)) & 1 for t in range(vocab)]
        assert [not torch.isinf(x) for x in got[row]] == [bool(a) for a in allowed]
    dispatched = logits.clone()
    apply_token_bitmask_(dispatched, bitmask, rows)
    assert torch.equal(dispatched, expected)


def test_rows_of_a_wider_tensor_and_bad_input() -> None:
    wide = torch.randn(3, 40)
    logits = wide[:, :33]  # rows with a stride of 40: written in place through the view
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    torch.ops.kvlm.apply_token_bitmask_(logits, bitmask, [1])
    assert torch.isinf(wide[1, :33]).all() and not torch.isinf(wide[1, 33:]).any()
    with pytest.raises(
        RuntimeError, match=r"bitmask must be a contiguous int32 CPU tensor \[1, 2\]"
    ):
        torch.ops.kvlm.apply_token_bitmask_(logits, torch.zeros(1, 3, dtype=torch.int32), [1])
    with pytest.raises(RuntimeError, match="row 3 is outside the logits' 3 rows"):
        torch.ops.kvlm.apply_token_bitmask_(logits, bitmask, [3])
    with pytest.raises(RuntimeError, match="2-D float32"):
        torch.ops.kvlm.apply_token_bitmask_(logits.double(), bitmask, [1])
    with pytest.raises(ValueError, match=r"bitmask must be int32 \[1, 2\]"):
        apply_token_bitmask_reference_(logits, torch.zeros(2, 2, dtype=torch.int32), [1])
