"""kvlm::argmax_rows (the greedy sampler's argmax) gives torch.argmax's answer on every row."""

from __future__ import annotations

import pytest
import torch

from kvlm.kernels import available_paths
from kvlm.kernels.reduce import argmax_rows

pytestmark = pytest.mark.skipif(
    "avx2" not in available_paths(), reason="the C++ argmax needs the AVX2 kernels"
)


def _check(x: torch.Tensor) -> None:
    got = torch.ops.kvlm.argmax_rows(x)
    assert torch.equal(got, x.argmax(dim=-1)), (got, x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x), got)


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (2, 8), (3, 9), (4, 13), (5, 49152), (2, 262144)]
)
def test_random_rows(shape: tuple[int, int]) -> None:
    _check(torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))))


@pytest.mark.parametrize("cols", [5, 8, 37, 1000])
def test_ties_take_the_first_index(cols: int) -> None:
    rows = torch.randint(0, 3, (6, cols), generator=torch.Generator().manual_seed(cols)).float()
    _check(rows)
    _check(torch.zeros(3, cols))


def test_nan_and_infinities() -> None:
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    x[0, 57] = x[0, 80] = float("nan")  # in the SIMD body: the first NaN wins
    x[1, 99] = float("nan")  # in the tail
    x[2, :] = float("-inf")
    x[3, 10] = float("inf")
    _check(x)


def test_strided_input_is_read_as_its_values() -> None:
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)).T  # [6, 64], not contiguous
    _check(x)


def test_refuses_other_inputs() -> None:
    with pytest.raises(RuntimeError, match="2-D float32"):
        torch.ops.kvlm.argmax_rows(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="2-D float32"):
        torch.ops.kvlm.argmax_rows(torch.randn(3, 0))
    doubles = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(argmax_rows(doubles), doubles.argmax(dim=-1))  # torch answers those
