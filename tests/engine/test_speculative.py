"""Speculative decoding: n-gram lookup, the verifier (greedy and rejection sampling), KV
rollback, back-off, config errors, and greedy output identical to decoding without it."""

from __future__ import annotations

import math
import pydoc_data.topics
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import chisquare

from kvlm import LLM, SamplingParams
from kvlm.cli.main import main
from kvlm.engine.async_engine import EngineStats
from kvlm.engine.config import EngineConfig, EngineConfigError
from kvlm.engine.request import Request, RequestStatus
from kvlm.engine.speculative import (
    NgramIndex,
    SpeculativeConfig,
    SpeculativeDecoder,
    SpeculativeStats,
    verify_drafts,
)
from kvlm.kv.block_hash import extend_block_hashes
from kvlm.sampling import Sampler, make_generator
from kvlm.server.metrics import ServerMetrics

SPEC = {"method": "ngram", "num_tokens": 4}
PASSAGE = pydoc_data.topics.topics["for"][:900]
# The answer copies the passage, so drafts from the prompt are accepted; where the model
# strays from it they are rejected.
REPEAT = f"Copy this text exactly.\n\n{PASSAGE}\n\nThe copy:\n\n{PASSAGE[:120]}"
ORACLE_PROMPTS = ["The history of the printing press begins", "def fibonacci(n):\n    "]


def _request(token_ids: list[int], params: SamplingParams, drafts: list[int]) -> Request:
    request = Request("r", None, list(token_ids), params, detokenizer=None)  # type: ignore[arg-type]
    request.generator = make_generator(params.seed, "cpu")
    request.spec_token_ids = list(drafts)
    return request


# --- n-gram lookup --------------------------------------------------------------------------


def test_lookup_takes_the_latest_earlier_occurrence_of_the_longest_ngram() -> None:
    index = NgramIndex(1, 3)
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 5, 6, 7, 2, 6, 7]
    # "6 7" ends at 3 and 7 (latest: continue with 2, 6, 7); no earlier "8 6 7" / "2 6 7".
    assert index.lookup(tokens, 3) == [2, 6, 7]
    tokens += [9]  # "9" never occurred before, nor "7 9"
    assert index.lookup(tokens, 3) == []
    tokens += [5, 6, 7]  # "5 6 7" ends at 3 and 7: the latest, at 7, continues 2, 6, 7, 9
    assert index.lookup(tokens, 4) == [2, 6, 7, 9]
    assert index.lookup(tokens, 9) == [2, 6, 7, 9, 5, 6, 7]  # up to the end, no further


def test_lookup_indexes_only_new_tokens_and_refuses_a_shrunk_history() -> None:
    index = NgramIndex(2, 2)
    tokens = [1, 2, 3, 1, 2]
    assert index.lookup(tokens, 2) == [3, 1]
    assert index.num_indexed == 4
    tokens.append(3)
    assert index.lookup(tokens, 2) == [1, 2]  # "2 3" ends at 3
    assert index.num_indexed == 5
    with pytest.raises(ValueError, match="shrank"):
        index.lookup(tokens[:3], 2)


def test_lookup_skips_a_virtual_prefix() -> None:
    index = NgramIndex(1, 1, first=2)
    assert index.lookup([9, 9, 4, 9], 1) == []  # the placeholders' 9s are not text


# --- the verifier ---------------------------------------------------------------------------


def _rows(*argmaxes: int, vocab: int = 6) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), vocab)
    for row, token in enumerate(argmaxes):
        logits[row, token] = 5.0
    return logits


def test_greedy_keeps_drafts_while_the_argmax_agrees_then_the_targets_token() -> None:
    greedy = SamplingParams(temperature=0, max_tokens=10)
    sampler = Sampler()
    assert verify_drafts(_rows(1, 2, 4, 5), _request([0], greedy, [1, 2, 3]), sampler) == [1, 2, 4]
    assert verify_drafts(_rows(3, 2), _request([0], greedy, [1]), sampler) == [3]
    assert verify_drafts(_rows(1, 2, 5), _request([0], greedy, [1, 2]), sampler) == [1, 2, 5]


def test_greedy_verification_applies_penalties_as_if_the_drafts_were_sampled() -> None:
    # Row 1's argmax is token 1 only by a little; the penalty on token 1 (the first draft,
    # now in the history) moves row 1 to token 2.
    params = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=2.0)
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 3.0, 2.0, 0.0]])
    assert verify_drafts(logits, _request([0], params, [1]), Sampler()) == [1, 2]


def test_min_tokens_bans_eos_in_every_row_it_covers() -> None:
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=2)
    request = _request([0, 0], params, [1, 1])  # nothing generated: rows 0 and 1 may not stop
    logits = _rows(1, 3, 3)  # EOS (3) leads in rows 1 and 2; row 1's runner-up is 2
    logits[1, 2] = 4.0
    assert verify_drafts(logits, request, Sampler(eos_token_ids=[3])) == [1, 2]


def test_rejection_sampling_follows_the_target_distribution() -> None:
    """First token after one n-gram draft (q one-hot at 1): accepted with p(1), else drawn
    from p without 1, so it follows p; the token after an accepted draft follows row 1."""
    p0 = torch.tensor([0.1, 0.4, 0.3, 0.2])
    p1 = torch.tensor([0.25, 0.25, 0.05, 0.45])
    logits = torch.stack([p0.log(), p1.log()])
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=1)
    request = _request([0], params, [1])
    first, after = torch.zeros(4), torch.zeros(4)
    num_draws = 4000
    for _ in range(num_draws):
        request.spec_token_ids = [1]
        tokens = verify_drafts(logits, request, Sampler())
        first[tokens[0]] += 1
        if len(tokens) == 2:
            after[tokens[1]] += 1
    assert chisquare(first, p0 * num_draws).pvalue > 1e-3
    assert chisquare(after, p1 * after.sum()).pvalue > 1e-3
    assert abs(after.sum() / num_draws - 0.4) < 0.03  # acceptance rate p0(1)


def test_rejection_sampling_honours_top_k() -> None:
    # top_k=2 leaves tokens 1 and 2 (0.4 / 0.3, renormalised); the draft 3 is never kept.
    logits = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]]).log()
    params = SamplingParams(temperature=1.0, top_k=2, max_tokens=10, seed=2)
    request = _request([0], params, [3])
    counts = torch.zeros(4)
    for _ in range(1500):
        request.spec_token_ids = [3]
        tokens = verify_drafts(logits, request, Sampler())
        assert len(tokens) == 1
        counts[tokens[0]] += 1
    assert counts[0] == counts[3] == 0
    assert chisquare(counts[1:3], torch.tensor([4 / 7, 3 / 7]) * 1500).pvalue > 1e-3


# --- proposing and back-off -----------------------------------------------------------------


def _running(token_ids: list[int], max_tokens: int = 100) -> Request:
    request = _request(token_ids, SamplingParams(temperature=0, max_tokens=max_tokens), [])
    request.status = RequestStatus.RUNNING
    request.num_computed_tokens = len(token_ids) - 1
    return request


def test_propose_caps_drafts_by_max_tokens_and_the_context() -> None:
    decoder = SpeculativeDecoder(SpeculativeConfig(num_tokens=4), Sampler())
    request = _running([1, 2, 3, 4, 5, 6, 1, 2], max_tokens=100)
    decoder.propose([request], max_model_len=None)
    assert request.spec_token_ids == [3, 4, 5, 6]
    decoder.propose([request], max_model_len=10)  # 8 tokens + 1 drafts + the target's own
    assert request.spec_token_ids == [3]
    request.num_prompt_tokens = 6  # 2 generated of max_tokens 4: room for 1 draft
    request.params = SamplingParams(temperature=0, max_tokens=4)
    decoder.propose([request], max_model_len=None)
    assert request.spec_token_ids == [3]


def test_no_drafts_while_prefilling_or_with_a_grammar_or_prompt_logprobs() -> None:
    decoder = SpeculativeDecoder(SpeculativeConfig(), Sampler())
    prefilling = _running([1, 2, 1, 2])
    prefilling.num_computed_tokens = 1
    scoring = _running([1, 2, 1, 2])
    scoring.params = SamplingParams(temperature=0, max_tokens=9, prompt_logprobs=0)
    constrained = _running([1, 2, 1, 2])
    constrained.grammar = object()  # type: ignore[assignment]
    decoder.propose([prefilling, scoring, constrained], max_model_len=None)
    assert [r.spec_token_ids for r in (prefilling, scoring, constrained)] == [[], [], []]


def test_poor_acceptance_backs_off_for_doubling_spans() -> None:
    decoder = SpeculativeDecoder(SpeculativeConfig(num_tokens=2), Sampler())
    request = _running([1, 2, 3, 1, 2])
    greedy_rejects = _rows(0, 0, 0)  # the target wants token 0 everywhere: drafts 3, 1 fail

    def step() -> bool:
        """One propose + verify; True when drafts were proposed."""
        decoder.propose([request], max_model_len=None)
        proposed = bool(request.spec_token_ids)
        rows = greedy_rejects[: 1 + len(request.spec_token_ids)]
        decoder.verify(rows, [request])
        return proposed

    # acceptance 1 -> 0.5 -> 0.25 < 0.3: back off 1 step, then 2 (threshold kept at 0.3).
    assert [step() for _ in range(8)] == [True, True, False, True, False, False, True, False]
    stats = decoder.stats
    assert (stats.num_steps, stats.num_drafts, stats.num_accepted_tokens) == (8, 4, 0)
    assert stats.mean_tokens_per_step == 1.0


def test_finished_requests_are_forgotten() -> None:
    decoder = SpeculativeDecoder(SpeculativeConfig(), Sampler())
    decoder.propose([_running([1, 2, 1])], max_model_len=None)
    decoder.propose([], max_model_len=None)
    assert decoder._states == {}


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "eagle"}, "unknown speculative method 'eagle'"),
        ({"num_tokens": 0}, "num_tokens must be an int >= 1"),
        ({"num_tokens": "4"}, "num_tokens must be an int >= 1"),
        ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "must not exceed"),
        ({"backoff_acceptance": 1.0}, "backoff_acceptance must be in"),
        ({"num_tokens": 3, "num_speculative_tokens": 3}, "num_tokens given twice"),
        ({"lookahead": 3}, "unknown speculative setting 'lookahead'"),
        ("ngram", "speculative must be a dict"),
    ],
)
def test_config_errors(value: Any, message: str) -> None:
    with pytest.raises(EngineConfigError, match=message):
        EngineConfig(speculative=value)


def test_config_takes_vllms_name_and_needs_the_cache() -> None:
    config = EngineConfig(speculative={"method": "ngram", "num_speculative_tokens": 3})
    assert config.speculative == SpeculativeConfig(num_tokens=3)
    with pytest.raises(EngineConfigError, match="needs the cache"):
        EngineConfig(speculative=SPEC, use_cache=False)


# --- the engine -----------------------------------------------------------------------------


def _generate_checked(llm: LLM, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    """Generate step by step; after each step the door is consistent, every request's tables
    hold exactly its computed tokens (rejected drafts' blocks freed), and every named block
    is named by its verified tokens."""
    engine = llm.engine
    cache = engine.kv_cache
    ids = [engine.add_request(p, None, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
        cache.check_integrity()
        for request in engine.running_requests():
            expected: list[bytes] = []
            extend_block_hashes(expected, request.token_ids, len(request.token_ids), 16)
            for group, table in enumerate(cache.block_tables(request.request_id)):
                assert len(table) == math.ceil(request.num_computed_tokens / 16)
                for i, block_id in enumerate(table):
                    name = cache.pools[group].blocks[block_id].block_hash
                    assert name is None or name == expected[i]
    return [tokens[i] for i in ids]


@pytest.fixture(scope="module")
def smollm2_spec() -> LLM:
    return LLM("smollm2", weight_format="float", speculative=SPEC)


def test_greedy_tokens_identical_on_smollm2(smollm2_llm: LLM, smollm2_spec: LLM) -> None:
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = [REPEAT, *ORACLE_PROMPTS]
    expected = [o.outputs[0].token_ids for o in smollm2_llm.generate(prompts, params)]
    assert _generate_checked(smollm2_spec, prompts, params) == expected
    stats = smollm2_spec.engine.speculative_stats
    assert stats is not None and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.mean_tokens_per_step > 1.0


def test_stops_inside_an_accepted_run_end_the_output_there(
    smollm2_llm: LLM, smollm2_spec: LLM
) -> None:
    """Stop strings, EOS-like stop ids and max_tokens cut an accepted run as plain decoding
    would stop (text, tokens and finish reason alike)."""
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reference = smollm2_llm.generate([REPEAT], plain)[0].outputs[0]
    stop_text = reference.text[20:28]
    for params in (
        SamplingParams(max_tokens=13, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, stop=[stop_text]),
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[reference.token_ids[17]]),
    ):
        want = smollm2_llm.generate([REPEAT], params)[0].outputs[0]
        got = smollm2_spec.generate([REPEAT], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
        )
    smollm2_spec.engine.kv_cache.check_integrity()


def test_prefix_hits_after_speculation_hold_verified_kv(
    smollm2_llm: LLM, smollm2_spec: LLM
) -> None:
    """A later prompt made of a speculative request's whole text hits its named blocks, and
    continues exactly as without the hit (drafts' K/V never leaked into a named block)."""
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    first = smollm2_spec.generate([REPEAT], params)[0]
    text_ids = first.prompt_token_ids + first.outputs[0].token_ids
    follow = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": text_ids}
    again = smollm2_spec.generate([prompt], follow)[0]
    # The prompt's blocks and at least one of generated text (the last step's accepted
    # drafts are not named: the request finished before a step named them).
    assert again.metrics.num_cached_tokens >= len(first.prompt_token_ids) // 16 * 16 + 16
    fresh = smollm2_llm.generate([prompt], follow, cache_salt="no-hit")[0]
    assert fresh.metrics.num_cached_tokens == 0
    assert again.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_sampled_generation_keeps_the_door_consistent(smollm2_spec: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, seed=3, logprobs=2)
    out = smollm2_spec.generate([REPEAT], params)[0].outputs[0]
    assert len(out.token_ids) == 24 and len(out.logprobs) == 24
    assert all(t in entry for t, entry in zip(out.token_ids, out.logprobs, strict=True))
    smollm2_spec.engine.kv_cache.check_integrity()


def test_greedy_tokens_identical_on_gemma3(gemma3_llm: LLM) -> None:
    """Two layer groups, one with a 512-token window: the prompt passes the window, so
    rollbacks happen where the window has already moved."""
    spec = LLM("gemma3-270m", weight_format="float", speculative=SPEC)
    passage = pydoc_data.topics.topics["class"][:2400]
    prompt = f"{passage}\n\nAgain, word for word:\n\n{passage[:100]}"
    assert len(gemma3_llm.tokenizer.encode(prompt)) > 512
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [prompt, ORACLE_PROMPTS[1]]
    expected = [o.outputs[0].token_ids for o in gemma3_llm.generate(prompts, params)]
    assert _generate_checked(spec, prompts, params) == expected
    stats = spec.engine.speculative_stats
    assert stats is not None and stats.num_accepted_tokens > 0


# --- /metrics -------------------------------------------------------------------------------


@dataclass
class _SnapshotOnly:
    snapshot: EngineStats

    def stats(self) -> EngineStats:
        return self.snapshot


def _spec_samples(stats: EngineStats) -> dict[str, float]:
    metrics = ServerMetrics(_SnapshotOnly(stats), "m")  # type: ignore[arg-type]
    return {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name.startswith("kvlm_spec_decode")
    }


def test_metrics_carry_acceptance_and_tokens_per_step() -> None:
    spec = SpeculativeStats(
        num_steps=10, num_tokens=25, num_drafts=6, num_draft_tokens=24, num_accepted_tokens=15
    )
    samples = _spec_samples(EngineStats(speculative=spec))
    assert samples["kvlm_spec_decode_num_drafts_total"] == 6
    assert samples["kvlm_spec_decode_num_draft_tokens_total"] == 24
    assert samples["kvlm_spec_decode_num_accepted_tokens_total"] == 15
    assert samples["kvlm_spec_decode_acceptance_ratio"] == 15 / 24
    assert samples["kvlm_spec_decode_mean_tokens_per_step"] == 2.5
    assert _spec_samples(EngineStats()) == {}  # speculation off: no such metric


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-speculative-tokens", "3"], "--num-speculative-tokens needs --speculative-method"),
        (
            ["--speculative-method", "ngram", "--num-speculative-tokens", "0"],
            "speculative num_tokens must be an int >= 1, got 0",
        ),
    ],
)
def test_cli_options_are_checked_before_loading(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "hi", *options]) == 2
    assert message in capsys.readouterr().err
