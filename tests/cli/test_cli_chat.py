"""`kvlm chat` over a pipe: the conversation grows and the prefix cache carries between turns."""

from __future__ import annotations

import io
import re

import pytest

from kvlm.cli.main import main

# Float weights: the test reads the answers, and greedy text on the int8-activation path
# depends on the CPU's rounding (on the Q4_1 file llama.cpp answers "L'Étoile, ..." too).
CHAT = ["chat", "--temperature", "0", "--max-tokens", "12", "--weight-format", "float"]


def _turn_stats(err: str) -> list[dict[str, int]]:
    pattern = r"\[turn (\d+)\] prompt (\d+) tok \| reused from cache (\d+) \| prefilled (\d+)"
    keys = ("turn", "prompt", "reused", "prefilled")
    return [dict(zip(keys, map(int, m), strict=True)) for m in re.findall(pattern, err)]


def test_chat_two_turns_reuse_the_cache(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = "What is the capital of France?\n\nAnd of Germany?\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(CHAT) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and "Berlin" in out
    assert "Traceback" not in err
    turns = _turn_stats(err)
    assert [t["turn"] for t in turns] == [1, 2]  # the blank line and text after /exit: no turn
    first, second = turns
    assert first["reused"] == 0
    assert second["prompt"] > first["prompt"]  # the whole conversation is sent again
    assert second["reused"] > 0  # ... but its start comes from the cache
    assert second["reused"] % 16 == 0  # whole blocks
    assert second["reused"] + second["prefilled"] == second["prompt"]
    assert re.search(r"ttft \d+ ms \| decode [\d.]+ tok/s", err)


def test_chat_ends_on_eof_and_reset(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = "What is the capital of France?\n/reset\nWhat is the capital of France?"
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(CHAT) == 0
    _, err = capsys.readouterr()
    assert "[conversation reset]" in err
    first, second = _turn_stats(err)
    # After /reset the same first question is asked: same prompt, its blocks reused.
    assert second["prompt"] == first["prompt"]
    assert second["reused"] == (first["prompt"] - 1) // 16 * 16
