"""The long-context task's generator and scorer (kvlm/bench/haystack.py), with no model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvlm.bench.haystack import (
    AnswerScore,
    HaystackConfig,
    HaystackError,
    HaystackTask,
    PlacedFact,
    make_task,
    score_task,
    scoring_split,
)
from kvlm.bench.press_spec import PressSpec, PressSpecError, parse_press
from kvlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


def _task(tokenizer: Tokenizer, bos: list[int] | None = None, **config: object) -> HaystackTask:
    return make_task(
        HaystackConfig(**config),  # type: ignore[arg-type]
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        bos or [],
    )


def _fact_span(task: HaystackTask, placed: PlacedFact, tokenizer: Tokenizer) -> list[int]:
    statement = tokenizer.encode(placed.fact.statement, add_special_tokens=False)
    return task.context_ids[placed.token_index : placed.token_index + len(statement)]


def test_same_seed_same_task_other_seed_other_facts(tokenizer: Tokenizer) -> None:
    a = _task(tokenizer, context_tokens=1000, num_facts=3, seed=7)
    b = _task(tokenizer, context_tokens=1000, num_facts=3, seed=7)
    c = _task(tokenizer, context_tokens=1000, num_facts=3, seed=8)
    assert a == b
    assert a.context_ids != c.context_ids
    assert [p.fact for p in a.facts] != [p.fact for p in c.facts]


@pytest.mark.parametrize("context_tokens", [2000, 4096, 6000])
def test_exact_budget_and_facts_at_their_depths(tokenizer: Tokenizer, context_tokens: int) -> None:
    depths = (0.0, 0.3, 0.55, 1.0)
    task = _task(tokenizer, [1], context_tokens=context_tokens, num_facts=4, depths=depths)
    assert len(task.context_ids) == context_tokens
    assert task.context_ids[0] == 1  # BOS first
    for placed, asked in zip(task.facts, depths, strict=True):
        assert abs(placed.depth - asked) < 0.03  # a line of the docs is ~15 tokens
        assert placed.depth == placed.token_index / context_tokens
        span = _fact_span(task, placed, tokenizer)
        assert tokenizer.decode(span) == placed.fact.statement  # the fact is there, whole
    values = [p.fact.value for p in task.facts]
    assert len(set(values)) == 4
    for part in (
        [p.fact.attribute for p in task.facts],
        [p.fact.key.split()[0] for p in task.facts],  # colours
        [p.fact.key.split()[1] for p in task.facts],  # places
    ):
        assert len(set(part)) == 4, part  # no two facts share one
    text = tokenizer.decode(task.context_ids)
    for placed in task.facts:
        assert text.count(placed.fact.value) == 1  # the docs never state the answer elsewhere


def test_default_depths_spread_evenly(tokenizer: Tokenizer) -> None:
    task = _task(tokenizer, context_tokens=2000, num_facts=4)
    assert [round(p.depth, 1) for p in task.facts] == [0.1, 0.4, 0.6, 0.9]


def test_questions_cue_the_answer(tokenizer: Tokenizer) -> None:
    task = _task(tokenizer, context_tokens=512, num_facts=1, seed=3)
    placed = task.facts[0]
    question = tokenizer.decode(placed.question_ids)
    assert question.endswith(f"Answer: The {placed.fact.attribute} of the {placed.fact.key} is")
    assert tokenizer.decode(placed.answer_ids) == f" {placed.fact.value}"
    prompt, continuation = scoring_split(task, placed, question_aware=False)
    assert prompt == task.context_ids
    assert continuation == placed.question_ids + placed.answer_ids
    prompt, continuation = scoring_split(task, placed, question_aware=True)
    assert prompt == task.context_ids + placed.question_ids
    assert continuation == placed.answer_ids


def test_bad_settings_name_the_value() -> None:
    with pytest.raises(HaystackError, match="context_tokens must be >= 256"):
        HaystackConfig(context_tokens=100)
    with pytest.raises(HaystackError, match=r"num_facts must be in \[1, 12\]"):
        HaystackConfig(num_facts=0)
    with pytest.raises(HaystackError, match="2 depths for 3 facts"):
        HaystackConfig(num_facts=3, depths=(0.1, 0.2))
    with pytest.raises(HaystackError, match=r"a depth must be in \[0, 1\], got 1.5"):
        HaystackConfig(num_facts=1, depths=(1.5,))


def test_too_many_facts_for_the_context(tokenizer: Tokenizer) -> None:
    with pytest.raises(HaystackError, match="use fewer facts or a longer context"):
        _task(tokenizer, context_tokens=256, num_facts=12)


def test_scores_of_a_hand_made_case(tokenizer: Tokenizer) -> None:
    task = _task(tokenizer, context_tokens=512, num_facts=2, seed=1)
    n0, n1 = (len(p.answer_ids) for p in task.facts)
    right = AnswerScore([-0.1] * n0, exact=True)
    wrong = AnswerScore([-0.5] * (n1 - 1) + [-3.0], exact=False)
    scores = score_task(task, [right, wrong])
    assert scores["exact_match"] == 0.5
    sum0, sum1 = -0.1 * n0, -0.5 * (n1 - 1) - 3.0
    assert scores["answer_logprob"] == pytest.approx((sum0 + sum1) / 2)
    assert scores["answer_token_perplexity"] == pytest.approx(math.exp(-(sum0 + sum1) / (n0 + n1)))
    assert [f["exact"] for f in scores["facts"]] == [True, False]  # type: ignore[index]
    assert scores["facts"][1]["logprob"] == pytest.approx(sum1)  # type: ignore[index]
    with pytest.raises(HaystackError, match="1 answer scores for 2 facts"):
        score_task(task, [right])
    with pytest.raises(HaystackError, match=f"for {n1} answer tokens"):
        score_task(task, [right, AnswerScore([-1.0], exact=True)])


def test_press_spec_round_trip_and_errors() -> None:
    assert parse_press("knorm:0.5") == PressSpec("knorm", 0.5)
    spec = parse_press("snapkv:0.75,window=32")
    assert spec == PressSpec("snapkv", 0.75, {"window": 32})
    assert spec.label == "snapkv:0.75,window=32"
    tova = parse_press("tova,budget=256")  # no ratio written: a budget instead
    assert tova == PressSpec("tova", None, {"budget": 256})
    assert tova.label == "tova,budget=256"
    for bad, message in [
        ("snapkv:", "write METHOD:RATIO"),
        (":0.5", "write METHOD:RATIO"),
        ("snapkv:half", "'half' is not a number"),
        ("snapkv:0.5,window", "is not NAME=INT"),
        ("snapkv:0.5,window=x", "window='x' is not an integer"),
        ("snapkv:0.5,window=8,window=9", "window is given twice"),
    ]:
        with pytest.raises(PressSpecError, match=message):
            parse_press(bad)
