"""`StepKernel`: the C++ paged kernel bound to one step checks each group's index inputs once
per step, and answers as the per-call entry does."""

from __future__ import annotations

import pytest
import torch

from kvlm.kernels import available_paths, paged
from tests.kernels.paged_steps import LAYER, Heads, make_step

pytestmark = pytest.mark.skipif(
    "ref" not in available_paths(), reason="the C++ kernels did not build"
)
SCALE = 0.125


def _step():
    """Two layers' group with a window and sinks, a mixed batch (prefill chunks and decode)."""
    return make_step(Heads(9, 3, 64), "int8", 16, 24, 4, [0, 45, 13], [17, 1, 5])


def _call(kernel, step, layer: int, **change) -> torch.Tensor:
    args = {
        "block_table": step.block_table,
        "query_start": step.query_start,
        "num_cached": step.num_cached,
        **change,
    }
    return kernel(
        step.kernel_query(), step.store, layer, scale=SCALE, sink_q=step.kernel_sink_query(), **args
    )


def test_layers_of_a_step_equal_the_per_call_entry() -> None:
    step = _step()
    kernel = paged.StepKernel()
    for layer in (0, LAYER):
        assert torch.equal(_call(kernel, step, layer), _call(paged.paged_attention, step, layer))


def test_checks_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    step = _step()
    calls = {"check_values": 0}
    for name in calls:
        original = getattr(paged, name)

        def counted(*args, _name=name, _original=original, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(paged, name, counted)
    kernel = paged.StepKernel()
    for _ in range(3):
        for layer in (0, LAYER):
            _call(kernel, step, layer)
    assert calls == {"check_values": 1}
    _call(paged.StepKernel(), step, 0)  # a new step checks again
    assert calls == {"check_values": 2}


def test_each_steps_inputs_are_refused_when_bad() -> None:
    step = _step()
    kernel = paged.StepKernel()
    _call(kernel, step, 0)
    table = step.block_table.clone()
    table[1, 0] = step.store.num_blocks
    with pytest.raises(ValueError, match="outside the store"):
        _call(kernel, step, LAYER, block_table=table)  # other tensors: checked anew
    with pytest.raises(ValueError, match="rise from 0 to T"):
        kernel(step.kernel_query()[:-1], step.store, LAYER, step.block_table, step.query_start,
               step.num_cached, SCALE, sink_q=step.kernel_sink_query())  # fmt: skip
