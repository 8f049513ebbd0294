"""models/layers.py: the activations a config may name, and the refusal of any other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlm.models.layers import activation


@pytest.mark.parametrize(
    ("name", "reference"),
    [("silu", F.silu), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))],
)
def test_known_activations_compute_what_they_name(name: str, reference) -> None:
    x = torch.linspace(-6, 6, 101)
    assert torch.equal(activation(name)(x), reference(x))


@pytest.mark.parametrize("name", ["gelu", "relu", "GELU_TANH", ""])
def test_unknown_activation_is_refused_naming_the_known_ones(name: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown activation '{name}': .*'silu', 'gelu_tanh'"):
        activation(name)
