"""`AsyncLLMEngine` on its own: outputs, errors raised to the caller, aborts when the consumer
stops, request-id reuse, shutdown. Real-engine tests borrow the live server's engine (a second
event loop is fine: each request answers on the loop that made it)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from live_server import LiveServer

from kvlm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from kvlm.engine.engine import InputError
from kvlm.engine.request import OutputAccumulator
from kvlm.engine.scheduler import SchedulerStats
from kvlm.sampling import SamplingParams
from kvlm.sampling.structured_grammar import GrammarCompiler
from kvlm.server import build_app

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_generate_yields_every_token_then_a_finished_output(server: LiveServer) -> None:
    async def run() -> list:
        return [o async for o in server.engine.generate("Once upon a time", params=GREEDY)]

    outputs = asyncio.run(asyncio.wait_for(run(), 60))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1] * 6  # deltas: one new token
    assert [o.finished for o in outputs] == [False] * 5 + [True]
    accumulated = OutputAccumulator()
    for output in outputs:
        accumulated.add(output)
    final = accumulated.build()
    assert final.outputs[0].text == "".join(o.outputs[0].text for o in outputs)
    assert final.outputs[0].token_ids == [o.outputs[0].token_ids[0] for o in outputs]
    assert final.metrics.num_generated_tokens == 6


def test_a_long_stream_sends_deltas_that_do_not_grow(server: LiveServer) -> None:
    """Each output carries one step's token, logprobs and text, however long the stream."""
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True, logprobs=2)

    async def run() -> list:
        return [o async for o in server.engine.generate("Count: 1, 2, 3,", params=params)]

    outputs = asyncio.run(asyncio.wait_for(run(), 120))
    assert len(outputs) == 150
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 1 and len(completion.logprobs) == 1
        assert len(completion.text) < 40  # one token's text, plus any held-back characters
        assert output.prompt_token_ids is outputs[0].prompt_token_ids  # shared, not copied
    accumulated = OutputAccumulator()
    for output in outputs:
        accumulated.add(output)
    final = accumulated.build().outputs[0]
    assert len(final.token_ids) == len(final.logprobs) == 150 and final.finish_reason == "length"


def test_add_request_errors_reach_the_caller(server: LiveServer) -> None:
    async def run() -> None:
        async for _ in server.engine.generate(prompt_token_ids=[], params=GREEDY):
            pass

    with pytest.raises(InputError, match="prompt is empty"):
        asyncio.run(asyncio.wait_for(run(), 30))


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_a_consumer_that_stops_aborts_its_request(server: LiveServer, how: str) -> None:
    """After two outputs the consumer leaves (closes the generator, or its task is cancelled):
    the request is aborted long before its 500 tokens and frees its blocks."""
    max_tokens = 500
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    async def run() -> int:
        two_outputs = asyncio.Event()
        num_outputs = 0

        async def consume() -> None:
            nonlocal num_outputs
            generator = server.engine.generate("Count to a thousand:", params=params)
            async for _ in generator:
                num_outputs += 1
                if num_outputs == 2:
                    two_outputs.set()
                    if how == "break":
                        await generator.aclose()
                        return

        task = asyncio.ensure_future(consume())
        await two_outputs.wait()
        if how == "cancel":
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return num_outputs

    before = server.wait_idle()["kvlm_generation_tokens_total"]
    num_outputs = asyncio.run(asyncio.wait_for(run(), 60))
    after = server.wait_idle(timeout=30)
    assert num_outputs >= 2 if how == "cancel" else num_outputs == 2
    assert after["kvlm_num_requests_running"] == 0
    assert after["kvlm_kv_cache_blocks_used"] == 0
    assert 2 <= after["kvlm_generation_tokens_total"] - before < max_tokens
    server.check_integrity()


def test_a_request_id_in_use_is_refused_and_the_first_request_survives(
    server: LiveServer,
) -> None:
    async def run() -> tuple[str, BaseException | None]:
        first = await server.engine.add_request("Hello", None, GREEDY, request_id="same")
        error = None
        try:
            await server.engine.add_request("Hi", None, GREEDY, request_id="same")
        except InputError as e:
            error = e
        outputs = [o async for o in first]
        return outputs[-1].outputs[0].finish_reason, error

    finish_reason, error = asyncio.run(asyncio.wait_for(run(), 60))
    assert finish_reason == "length"
    assert isinstance(error, InputError) and "'same'" in str(error)


class _NeverFinishingEngine:
    """Just enough of LLMEngine: requests are accepted and then never produce a token."""

    def __init__(self) -> None:
        self.tokenizer = None
        self.model_config = SimpleNamespace(vocab_size=8)
        self.max_model_len = 64
        self.kv_cache = None
        self.unbounded_length = False
        self.prefix_adapters = None
        self.offload = None
        # A compiler that is never used: no request here asks for a grammar.
        self.structured = SimpleNamespace(compiler=GrammarCompiler(self._no_tokenizer, 8))
        self.scheduler_stats = SchedulerStats()
        self.speculative_stats = None  # no speculative decoding
        self.requests: dict[str, SimpleNamespace] = {}
        self.stepping = threading.Event()

    @staticmethod
    def _no_tokenizer():
        raise AssertionError("the fake engine compiles no grammar")

    def add_request(
        self, prompt, prompt_token_ids, params, cache_salt, request_id, prefix_adapter
    ) -> str:
        self.requests[request_id] = SimpleNamespace(metrics=SimpleNamespace(num_prompt_tokens=1))
        return request_id

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def running_requests(self) -> list:
        return []

    def waiting_requests(self) -> list:
        return []

    def step(self) -> list:
        self.stepping.set()
        threading.Event().wait(0.01)
        return []


def test_shutdown_fails_in_flight_requests_and_refuses_new_ones() -> None:
    fake = _NeverFinishingEngine()
    engine = AsyncLLMEngine(fake)  # type: ignore[arg-type]

    async def run() -> None:
        stream = await engine.add_request("x", None, GREEDY)
        assert fake.stepping.wait(5)
        engine.shutdown()
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(stream.__anext__(), 5)
        with pytest.raises(EngineDeadError):
            await engine.add_request("y", None, GREEDY)
        with pytest.raises(EngineDeadError):
            engine.call(lambda e: None).result(timeout=5)

    asyncio.run(asyncio.wait_for(run(), 30))
    assert fake.requests == {}  # the in-flight request was aborted
    with TestClient(build_app(engine, "fake")) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert "stopped" in health.json()["error"]["message"]
        assert client.get("/metrics").status_code == 200
        body = {"prompt": [1, 2], "max_tokens": 2}
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "engine_dead"
