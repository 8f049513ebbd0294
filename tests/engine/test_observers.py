"""The engine's observer API: request lifecycle events, per-step events with the batch, the
block tables during the forward pass and after the cache update, and the step's outputs."""

from __future__ import annotations

import pytest

from kvlm import LLM
from kvlm.engine import engine as engine_module
from kvlm.engine.observers import (
    EngineObserver,
    ForwardEvent,
    Observers,
    RequestEvent,
    StepEvent,
)
from kvlm.kv.block_pool import NULL_BLOCK_ID
from kvlm.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


class Log(EngineObserver):
    def __init__(self) -> None:
        self.events: list[RequestEvent | ForwardEvent | StepEvent] = []
        self.forward_counts: list[list[int]] = []  # computed counts seen in on_forward

    def on_request(self, event: RequestEvent) -> None:
        self.events.append(event)

    def on_forward(self, event: ForwardEvent) -> None:
        self.events.append(event)
        self.forward_counts.append([s.request.num_computed_tokens for s in event.scheduled])

    def on_step(self, event: StepEvent) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def _run(llm: LLM) -> list:
    outputs = []
    while llm.engine.has_unfinished():
        outputs.append(llm.engine.step())
    return outputs


def test_lifecycle_steps_and_outputs() -> None:
    llm = LLM("smollm2", weight_format="float", block_size=16, max_num_batched_tokens=24)
    engine, log = llm.engine, Log()
    engine.add_observer(log)
    prompt = list(range(100, 140))  # 40 tokens: two full blocks to share
    first = engine.add_request(None, prompt, GREEDY)
    step_outputs = _run(llm)
    second = engine.add_request(None, prompt + [7, 8], GREEDY)
    step_outputs += _run(llm)
    kinds = [(e.kind, e.request.request_id) for e in log.of(RequestEvent)]
    assert kinds == [
        ("added", first),
        ("admitted", first),
        ("finished", first),
        ("added", second),
        ("admitted", second),
        ("finished", second),
    ]
    admitted = [e.num_cached_tokens for e in log.of(RequestEvent) if e.kind == "admitted"]
    assert admitted == [0, 32]
    steps = log.of(StepEvent)
    assert (
        [e.step for e in steps]
        == list(range(1, len(steps) + 1))
        == [e.step for e in log.of(ForwardEvent)]
    )
    assert [list(e.outputs) for e in steps] == step_outputs
    # The first request: a 40-token prompt in chunks of 24 and 16, then 3 decodes.
    first_steps = [s for e in steps for s in e.scheduled if s.request.request_id == first]
    assert [(s.start, s.num_tokens) for s in first_steps] == [(0, 24), (24, 16)] + [
        (40 + i, 1) for i in range(3)
    ]
    second_steps = [s for e in steps for s in e.scheduled if s.request.request_id == second]
    assert second_steps[0].start == 32  # the shared blocks were not computed again
    # on_forward comes before the cache update: the computed counts are the steps' starts.
    forward = log.of(ForwardEvent)
    assert log.forward_counts == [[s.start for s in e.scheduled] for e in forward]
    for event in steps:
        for s, written, after in zip(
            event.scheduled, event.tables_written, event.tables_after, strict=True
        ):
            assert len(written[0]) * 16 >= s.end and after == written  # full attention
    engine.remove_observer(log)
    assert engine.scheduler.notify is None
    engine.kv_cache.check_integrity()


def test_tables_after_show_what_a_window_let_go() -> None:
    llm = LLM(
        "smollm2",
        weight_format="float",
        block_size=16,
        max_num_batched_tokens=32,
        sliding_window=16,
    )
    log = Log()
    llm.engine.add_observer(log)
    llm.engine.add_request(None, list(range(100, 196)), SamplingParams(max_tokens=1))
    _run(llm)
    freed = 0
    for event in log.of(StepEvent):
        [written], [after] = event.tables_written, event.tables_after
        assert NULL_BLOCK_ID not in written[0][-1:]  # the pass wrote into real blocks
        for before, now in zip(written[0], after[0], strict=True):
            assert now in (before, NULL_BLOCK_ID)
            freed += before != NULL_BLOCK_ID and now == NULL_BLOCK_ID
    assert freed >= 3  # 96 tokens, a 16-token window: the early blocks went back


def test_preempted_and_aborted() -> None:
    # Room for one 128-token sequence and a little: two growing requests cannot both fit.
    llm = LLM(
        "smollm2",
        weight_format="float",
        block_size=16,
        max_model_len=128,
        kv_cache_memory=46080 * 144,
    )
    engine, log = llm.engine, Log()
    engine.add_observer(log)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    engine.add_request(None, list(range(100, 160)), params, request_id="a")
    engine.add_request(None, list(range(200, 260)), params, request_id="b")
    _run(llm)
    preempted = [e.request.request_id for e in log.of(RequestEvent) if e.kind == "preempted"]
    assert preempted and set(preempted) <= {"a", "b"}
    engine.add_request(None, [1, 2, 3], params, request_id="c")
    engine.step()
    engine.abort("c")
    last = log.of(RequestEvent)[-1]
    assert (last.kind, last.request.request_id, last.request.finish_reason) == (
        "aborted",
        "c",
        "abort",
    )
    engine.remove_observer(log)
    engine.kv_cache.check_integrity()


def test_no_observer_builds_no_event(monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM("smollm2", weight_format="float")
    log = Log()
    llm.engine.add_observer(log)
    llm.engine.remove_observer(log)

    def refuse(*args: object) -> None:
        raise AssertionError("an event was built with nobody listening")

    monkeypatch.setattr(Observers, "forward", refuse)
    monkeypatch.setattr(Observers, "request", refuse)
    monkeypatch.setattr(engine_module, "block_tables", refuse)
    llm.generate("Hello", GREEDY)
    assert log.events == []


def test_an_observer_is_added_once() -> None:
    observers, log = Observers(), Log()
    observers.add(log)
    with pytest.raises(ValueError, match="already observes"):
        observers.add(log)
    observers.remove(log)
    observers.remove(log)  # a no-op
    assert not observers
