"""Beam search on forked requests: parameters validated, beams sharing blocks (peak far below
w independent sequences), every block returned at the end. Exactness against transformers
is tests/oracle/test_beam_search_oracle.py."""

from __future__ import annotations

import pytest

from kvlm import SamplingParams
from kvlm.engine.observers import EngineObserver, ForwardEvent
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.sampling import SamplingParamsError
from kvlm.sampling.beam import BeamSearchParams

PROMPT = "The history of the printing press begins in"
NEW_TOKENS = 16


class PeakBlocks(EngineObserver):
    """The most KV blocks held at once (all groups), read through the cache's door after each
    forward pass, when the step's blocks are all allocated."""

    def __init__(self, cache: KVCacheManager) -> None:
        self.cache = cache
        self.peak = 0

    def on_forward(self, event: ForwardEvent) -> None:
        self.peak = max(self.peak, sum(self.cache.num_used_blocks()))


def _peak_blocks(engine, run) -> int:
    observer = PeakBlocks(engine.kv_cache)
    engine.add_observer(observer)
    try:
        run()
    finally:
        engine.remove_observer(observer)
    return observer.peak


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
        ({"beam_width": -1, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2.0, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -1.0}, "temperature"),
        ({"beam_width": 2, "max_tokens": 4, "early_stopping": "sometimes"}, "early_stopping"),
        ({"beam_width": 2, "max_tokens": 4, "early_stopping": 1}, "early_stopping"),
    ],
)
def test_bad_params_name_the_field(fields, name):
    with pytest.raises(SamplingParamsError, match=name):
        BeamSearchParams(**fields)


def test_beam_width_beyond_one_step_is_refused(smollm2_llm):
    limit = smollm2_llm.config.max_num_seqs
    with pytest.raises(ValueError, match="beam_width"):
        smollm2_llm.beam_search(PROMPT, BeamSearchParams(beam_width=limit + 1, max_tokens=4))


def test_beams_share_blocks_and_return_them(smollm2_llm):
    engine = smollm2_llm.engine
    cache = engine.kv_cache
    width = 4
    # ~200 prompt tokens: their blocks dominate what w independent sequences hold
    prompt_ids = smollm2_llm.tokenizer.encode(" ".join([PROMPT] * 20))
    used_before = cache.num_used_blocks()
    params = BeamSearchParams(beam_width=width, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = []

    def beams() -> None:
        results.extend(smollm2_llm.beam_search({"prompt_token_ids": prompt_ids}, params))

    beam_peak = _peak_blocks(engine, beams)
    cache.check_integrity()
    assert cache.num_used_blocks() == used_before, "every beam's blocks are returned"
    [out] = results
    assert len(out.sequences) == width
    assert len({tuple(s.tokens) for s in out.sequences}) == width
    assert all(len(s.output_token_ids) == NEW_TOKENS for s in out.sequences)
    assert [s.score for s in out.sequences] == sorted(
        (s.score for s in out.sequences), reverse=True
    )

    def independent() -> None:  # w sequences of the same length, no block shared (own salts)
        one = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0)
        for i in range(width):
            engine.add_request(None, prompt_ids, one, cache_salt=f"independent-{i}")
        while engine.has_unfinished():
            engine.step()

    independent_peak = _peak_blocks(engine, independent)
    cache.check_integrity()
    print(f"peak KV blocks, width {width}: beams {beam_peak}, independent {independent_peak}")
    block_size = cache.block_size
    one_sequence = -(-(len(prompt_ids) + NEW_TOKENS) // block_size)
    assert independent_peak >= width * (one_sequence - 1)
    assert beam_peak <= one_sequence + 2 * width * (-(-NEW_TOKENS // block_size) + 1)
    assert beam_peak < independent_peak / 2
