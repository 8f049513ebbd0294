"""A server's engine leaves one core to the event loop for small batches."""

from __future__ import annotations

import torch

from kvlm.engine.step_threads import SMALL_BATCH, StepThreads


def test_small_batches_leave_one_core_free() -> None:
    policy = StepThreads(threads=4)
    assert [policy.for_batch(n) for n in (0, 1, SMALL_BATCH)] == [3, 3, 3]
    assert [policy.for_batch(n) for n in (SMALL_BATCH + 1, 4 * SMALL_BATCH)] == [4, 4]


def test_one_thread_stays_one() -> None:
    assert StepThreads(threads=1).for_batch(1) == 1


def test_apply_sets_torch_threads_and_restores() -> None:
    before = torch.get_num_threads()
    policy = StepThreads(threads=2)
    try:
        policy.apply(1)
        assert torch.get_num_threads() == 1
        policy.apply(SMALL_BATCH + 1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
