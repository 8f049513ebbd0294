"""The persistent batch state equals a from-scratch build of the block tables after any run of
cache events: joins, growth, window frees, rollbacks, forks with copy-on-write, preemptions
and finishes, with the step's requests in any order (random sequences of events, hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlm.engine.input_batch import InputBatch
from kvlm.kv.block_pool import NULL_BLOCK_ID
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.spec import KVCacheSpec

BLOCK = 4
SPECS = (
    KVCacheSpec((0,), 1, 4, BLOCK, "float32"),  # full attention
    KVCacheSpec((1,), 1, 4, BLOCK, "float32", 8, 2),  # window of 8 behind 2 sinks
    KVCacheSpec((2,), 1, 4, BLOCK, "float32", 6),  # window of 6, no sinks
)
NUM_BLOCKS = 200
IDS = [f"r{i}" for i in range(6)]


def _check(batch: InputBatch, cache: KVCacheManager, step_ids: list[str]) -> None:
    """Rows 0 .. B - 1 are the step's requests' tables, null-padded to the buffer's width."""
    assert batch.request_ids[: len(step_ids)] == step_ids
    assert len(set(batch.request_ids)) == batch.num_rows
    width = batch.max_blocks_per_seq
    for g in range(len(SPECS)):
        rows = batch.block_table(g, len(step_ids))
        assert rows.shape == (len(step_ids), width) and rows.dtype == torch.int64
        expected = [t[g] + [NULL_BLOCK_ID] * (width - len(t[g])) for t in
                    (cache.block_tables(i) for i in step_ids)]  # fmt: skip
        assert rows.tolist() == expected


class _World:
    """Requests with a token count each, driven through the cache manager as an engine would."""

    def __init__(self) -> None:
        self.cache = KVCacheManager(SPECS, [NUM_BLOCKS] * len(SPECS), enable_prefix_caching=False)
        self.batch = InputBatch(SPECS, self.cache, torch.device("cpu"), 2, 2)
        self.lengths: dict[str, int] = {}

    def apply(self, event: str, request: str, amount: int) -> None:
        held = request in self.lengths
        if event == "join" and not held:
            self.lengths[request] = amount
            self.cache.allocate(request, amount)
        elif event == "grow" and held:
            self.lengths[request] += amount
            self.cache.allocate(request, self.lengths[request])
            self.cache.remove_skipped(request, self.lengths[request] - 1)
        elif event == "free" and held:  # a finish or a preemption
            del self.lengths[request]
            self.cache.free(request)
        elif event == "rollback" and held:
            keep = max(self.lengths[request] - amount, 1)
            try:
                self.cache.truncate(request, keep)
            except ValueError:  # the window let go of what the shorter sequence reads
                return
            self.lengths[request] = keep
        elif event == "fork" and held:
            child = f"{request}.fork"
            if child in self.lengths:
                return
            self.cache.fork(request, child)
            self.lengths[child] = self.lengths[request]
            self.cache.copy_on_write(child, self.lengths[child])


EVENTS = st.tuples(
    st.sampled_from(["join", "grow", "grow", "grow", "free", "rollback", "fork"]),
    st.sampled_from(IDS),
    st.integers(1, 13),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(EVENTS, max_size=4), st.randoms()), min_size=1, max_size=25))
def test_rows_equal_a_fresh_build_after_any_events(steps) -> None:
    world = _World()
    for events, rng in steps:
        for event in events:
            world.apply(*event)
        step_ids = list(world.lengths)
        rng.shuffle(step_ids)
        step_ids = step_ids[: rng.randint(0, len(step_ids))]  # some may sit a step out
        world.batch.update(step_ids)
        _check(world.batch, world.cache, step_ids)
        world.cache.check_integrity()


def test_a_window_nulls_only_the_entries_it_let_go_of_and_rows_stay_dense() -> None:
    world = _World()
    world.apply("join", "a", 9)  # blocks 0..2 of 4 tokens
    world.apply("join", "b", 3)
    world.batch.update(["a", "b"])
    assert world.batch.row_of == {"a": 0, "b": 1}
    world.apply("grow", "a", 12)  # 21 tokens: the window of 6 reads positions 15..20
    world.batch.update(["a", "b"])
    _check(world.batch, world.cache, ["a", "b"])
    no_sinks = world.batch.block_table(2, 1)[0].tolist()
    assert no_sinks[:3] == [NULL_BLOCK_ID] * 3 and NULL_BLOCK_ID not in no_sinks[3:6]
    sinks = world.batch.block_table(1, 1)[0].tolist()
    assert sinks[0] != NULL_BLOCK_ID and sinks[1:3] == [NULL_BLOCK_ID] * 2  # the sinks' block
    world.apply("free", "a", 0)
    world.batch.update(["b"])
    assert world.batch.request_ids == ["b"] and world.batch.row_of == {"b": 0}
    _check(world.batch, world.cache, ["b"])
