"""n > 1 and best_of: one prefill, prompt blocks shared by reference, each sequence seeded
seed + index, best_of ranked by cumulative log-probability, aborts and preemption."""

from __future__ import annotations

import pytest

from kvlm import LLM, SamplingParams
from kvlm.engine.engine import InputError, LLMEngine
from kvlm.engine.observers import EngineObserver, ForwardEvent
from kvlm.engine.parallel_sampling import cumulative_logprob
from kvlm.engine.request import OutputAccumulator, RequestOutput

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2", num_threads=1)


class PromptTokens(EngineObserver):
    """Counts the prompt tokens each forward pass computes (K/V written), all requests."""

    def __init__(self, num_prompt_tokens: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.computed = 0

    def on_forward(self, event: ForwardEvent) -> None:
        for s in event.scheduled:
            self.computed += max(0, min(s.end, self.num_prompt_tokens) - s.start)


def run(engine: LLMEngine, request_ids: list[str]) -> dict[str, RequestOutput]:
    """Step until every request finished, checking the cache's invariants after each step."""
    outputs = {i: OutputAccumulator() for i in request_ids}
    while engine.has_unfinished():
        for delta in engine.step():
            outputs[delta.request_id].add(delta)
        assert engine.kv_cache is not None
        engine.kv_cache.check_integrity()
    return {i: o.build() for i, o in outputs.items()}


def texts(output: RequestOutput) -> list[str]:
    return [c.text for c in output.outputs]


def test_each_sequence_is_seeded_seed_plus_index_whatever_the_batch(llm: LLM) -> None:
    params = SamplingParams(n=4, max_tokens=10, seed=11, ignore_eos=True)
    together = llm.generate([PROMPT], params)[0]
    assert [c.index for c in together.outputs] == [0, 1, 2, 3]
    alone = [
        llm.generate([PROMPT], SamplingParams(max_tokens=10, seed=11 + j, ignore_eos=True))[0]
        for j in range(4)
    ]
    assert texts(together) == [a.outputs[0].text for a in alone]
    assert len(set(texts(together))) > 1, "the sequences should differ"
    # Beside other requests, admitted a step later: the same tokens per sequence.
    engine = llm.engine
    other = engine.add_request("Water is made of", None, SamplingParams(max_tokens=30, seed=1))
    engine.step()
    mine = engine.add_request(PROMPT, None, params)
    outputs = run(engine, [other, mine])
    assert texts(outputs[mine]) == texts(together)
    assert outputs[mine].metrics.num_generated_tokens == 40
    assert engine.kv_cache_bytes_used() == 0


def test_n8_prefills_once_and_shares_the_prompts_blocks(llm: LLM) -> None:
    engine = llm.engine
    assert engine.kv_cache is not None
    block_size = engine.kv_cache.block_size
    prompt = [100 + (i * 7) % 5000 for i in range(1000)]
    peaks = {}
    for n in (1, 8):
        engine.kv_cache.reset_prefix_cache()  # both compute the whole prompt
        counter = PromptTokens(len(prompt))
        engine.add_observer(counter)
        params = SamplingParams(n=n, max_tokens=64, seed=3, ignore_eos=True)
        request_id = engine.add_request(None, prompt, params)
        output = run(engine, [request_id])[request_id]
        engine.remove_observer(counter)
        assert counter.computed == len(prompt), f"n={n}: the prompt is computed once"
        assert [len(c.token_ids) for c in output.outputs] == [64] * n
        peaks[n] = output.metrics.kv_peak_bytes
    # Each sequence holds K/V of 1,063 tokens (its last token is never computed): 67 blocks,
    # of which the prompt's 62 full ones are shared; each sequence owns the other 5.
    held_per_seq = -(-(len(prompt) + 63) // block_size)
    shared = len(prompt) // block_size
    page = peaks[1] // held_per_seq
    assert peaks[8] == (shared + 8 * (held_per_seq - shared)) * page
    ratio = peaks[8] / peaks[1]
    print(f"kv_peak_bytes n=8 / n=1: {ratio:.3f} (8 unshared sequences: 8.0)")
    assert ratio < 1.6
    assert engine.kv_cache_bytes_used() == 0


def test_best_of_returns_the_highest_cumulative_logprobs(llm: LLM) -> None:
    every = SamplingParams(n=5, max_tokens=12, seed=5, logprobs=0, ignore_eos=True)
    scores = sorted(
        ((cumulative_logprob(c), c.text) for c in llm.generate([PROMPT], every)[0].outputs),
        reverse=True,
    )
    ranked = SamplingParams(n=2, best_of=5, max_tokens=12, seed=5, ignore_eos=True)
    best = llm.generate([PROMPT], ranked)[0]  # the same 5 samples as `every`, ranked
    assert [c.index for c in best.outputs] == [0, 1]
    assert texts(best) == [text for _, text in scores[:2]]
    for completion, (score, _) in zip(best.outputs, scores, strict=False):
        assert completion.cumulative_logprob == pytest.approx(score)
        assert completion.logprobs is None  # ranked internally; not asked for
    assert best.metrics.num_generated_tokens <= 5 * 12


def test_aborting_the_request_aborts_its_sequences_and_frees_every_block(llm: LLM) -> None:
    engine = llm.engine
    request_id = engine.add_request(PROMPT, None, SamplingParams(n=6, max_tokens=50, seed=0))
    for _ in range(3):
        engine.step()
    assert len(engine.running_requests()) == 6
    engine.abort(request_id)
    assert not engine.has_unfinished() and not engine.requests
    assert engine.kv_cache_bytes_used() == 0
    assert engine.kv_cache is not None
    engine.kv_cache.check_integrity()
    assert not engine.parallel.groups


def test_structured_outputs_with_n_is_refused(llm: LLM) -> None:
    from kvlm.sampling import StructuredOutputsParams

    params = SamplingParams(n=2, structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    with pytest.raises(InputError, match="n or best_of above 1"):
        llm.engine.add_request(PROMPT, None, params)


def test_a_preempted_sequence_recomputes_its_prompt_and_output() -> None:
    # 12 blocks of 4 tokens: 3 sequences of 6 prompt + 12 generated tokens need 1 shared
    # block and 4 each, so one is preempted and recomputed from the cached prompt.
    tiny = LLM("smollm2", block_size=4, kv_cache_memory=12 * 4 * 46080, max_model_len=48)
    engine = tiny.engine
    prompt = [504, 3575, 282, 4649, 314, 216]
    params = SamplingParams(n=3, max_tokens=12, seed=9, ignore_eos=True)
    request_id = engine.add_request(None, prompt, params)
    output = run(engine, [request_id])[request_id]
    assert output.metrics.num_preemptions > 0
    alone = [
        tiny.generate(
            [{"prompt_token_ids": prompt}],
            SamplingParams(max_tokens=12, seed=9 + j, ignore_eos=True),
        )[0]
        .outputs[0]
        .token_ids
        for j in range(3)
    ]
    assert [c.token_ids for c in output.outputs] == alone
    assert engine.kv_cache_bytes_used() == 0
