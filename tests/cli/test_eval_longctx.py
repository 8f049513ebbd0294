"""`kvlm eval longctx` and `kvlm eval ppl --context-tokens/--kv-press`: real runs on SmolLM2
(short contexts), the scores' JSON, and bad values (one error line, exit 2)."""

from __future__ import annotations

import json

import pytest

from kvlm.bench.haystack import HaystackConfig, HaystackTask, score_task
from kvlm.bench.longctx import answer_scores, build_task
from kvlm.cli import common
from kvlm.cli.main import main

FLOAT = ["--weight-format", "float"]  # the exact path: a 135M model's recall has thin margins


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plain_cache_finds_the_facts_and_misses_absent_ones() -> None:
    """Exact match and log-likelihood find every fact through the plain cache; the same
    questions over a haystack without those facts (another seed's) find none of them."""
    smollm2_llm = common.LLM(model="smollm2", weight_format="float")  # conftest's cached one
    task = build_task(smollm2_llm, HaystackConfig(context_tokens=768, num_facts=3, seed=0))
    found = score_task(task, answer_scores(smollm2_llm, task, None, question_aware=False))
    assert found["exact_match"] == 1.0
    other = build_task(smollm2_llm, HaystackConfig(context_tokens=768, num_facts=3, seed=1))
    absent = HaystackTask(task.config, other.context_ids, task.facts)
    missed = score_task(absent, answer_scores(smollm2_llm, absent, None, question_aware=False))
    assert missed["exact_match"] == 0.0
    assert found["answer_logprob"] > missed["answer_logprob"] + 5  # nats, per answer
    aware = score_task(task, answer_scores(smollm2_llm, task, None, question_aware=True))
    # the same tokens through the same cache, split at another place
    assert aware["answer_logprob"] == pytest.approx(found["answer_logprob"], abs=1e-3)


def test_longctx_json(capsys: pytest.CaptureFixture[str]) -> None:
    result = _json(
        ["longctx", "--model", "smollm2", "--context-tokens", "512", "--num-facts", "2", *FLOAT],
        capsys,
    )
    assert result["task"] == "longctx" and result["backend"] == "kvlm"
    assert result["context_tokens"] == 512 and result["num_facts"] == 2
    assert result["kv_press"] is None and result["question_aware"] is False
    assert result["exact_match"] == 1.0
    assert [f["depth"] for f in result["facts"]] == pytest.approx([0.25, 0.75], abs=0.05)


def test_a_press_that_drops_nothing_scores_as_the_plain_cache(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["longctx", "--context-tokens", "512", "--num-facts", "2", *FLOAT]
    plain = _json(argv, capsys)
    kept = _json([*argv, "--kv-press", "knorm:0"], capsys)
    assert kept["kv_press"] == "knorm:0"
    assert kept["answer_logprob"] == pytest.approx(plain["answer_logprob"], abs=1e-3)


def test_ppl_after_a_pressed_context(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ppl", "--max-tokens", "384", "--context-tokens", "256", *FLOAT]
    plain = _json(argv, capsys)
    pressed = _json([*argv, "--kv-press", "knorm:0.75"], capsys)
    assert plain["context_tokens"] == pressed["context_tokens"] == 256
    assert pressed["kv_press"] == "knorm:0.75" and plain["kv_press"] is None
    assert pressed["perplexity"] > plain["perplexity"]  # 3/4 of the context's K/V are gone


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["longctx", "--kv-press", "tova9:0.5"], "unknown kv press 'tova9'"),
        (["longctx", "--kv-press", "snapkv:1.5"], "ratio must be in [0, 1)"),
        (["longctx", "--kv-press", "snapkv"], "write METHOD:RATIO"),
        (["longctx", "--kv-press", "tova,budget=0"], "budget must be >= 1 token"),
        (["longctx", "--kv-press", "snapkv:0.5,depth=3"], "no option 'depth'"),
        (["longctx", "--kv-press", "snapkv:0.5,window=0"], "window must be >= 1"),
        (["longctx", "--num-facts", "0"], "num_facts must be in [1, 12]"),
        (["longctx", "--context-tokens", "100"], "context_tokens must be >= 256"),
        (["longctx", "--no-cache"], "drop --no-cache"),
        (["ppl", "--kv-press", "knorm:0.5"], "--kv-press needs --context-tokens"),
        (["ppl", "--max-tokens", "64", "--context-tokens", "63"], "--context-tokens must be in"),
    ],
)
def test_bad_values_exit_2_before_loading(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_too_many_facts_for_the_context_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "longctx", "--context-tokens", "256", "--num-facts", "12"]) == 2
    assert "use fewer facts or a longer context" in capsys.readouterr().err
