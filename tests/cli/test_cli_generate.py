"""`kvlm generate`: streamed text on stdout, one stats line on stderr."""

from __future__ import annotations

import re

import pytest

from kvlm.cli.main import main

GREEDY = ["--temperature", "0", "--max-tokens", "8"]


def test_generate_streams_text_and_prints_stats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "The capital of France is", *GREEDY]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "Traceback" not in err
    stats = err.strip().splitlines()[-1]
    assert re.search(r"ttft \d+ ms", stats), stats
    assert re.search(r"decode [\d.]+ tok/s", stats), stats
    assert "prompt 5 tok" in stats and "generated 8 tok" in stats
    # 5 prompt tokens + 7 computed outputs: 12 tokens with K/V fit one 16-token block.
    assert re.search(r"kv cache peak [\d.]+ KiB \(float32, pool [\d.]+ MiB\)", stats), stats


def test_generate_streams_each_delta(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    monkeypatch.setattr("sys.stdout.write", writes.append)
    assert main(["generate", "The capital of France is", *GREEDY]) == 0
    # One write per step that produced text, then the closing newline: the text streams.
    assert len(writes) >= 5
    assert "".join(writes).startswith(" Paris")


def test_generate_no_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "The capital of France is", "--no-cache", *GREEDY]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out  # greedy: the same text as with the cache
    assert "no cache" in err.strip().splitlines()[-1]


def test_generate_chat_template(capsys: pytest.CaptureFixture[str]) -> None:
    # Float weights: on the int8-activation path the greedy answer to this chat prompt depends
    # on the CPU's rounding (llama.cpp answers "L'Étoile, la Marseillaise" on the same file).
    args = ["generate", "What is the capital of France?", "--chat", *GREEDY]
    args += ["--weight-format", "float"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    # The SmolLM2 template adds its system prompt: far more than the 7 tokens of the text.
    prompt_tokens = int(re.search(r"prompt (\d+) tok", err).group(1))
    assert prompt_tokens > 20


def test_generate_stop_string(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "The capital of France is", "--temperature", "0", "--stop", "."]
    assert main([*args, "--max-tokens", "16"]) == 0
    out, _ = capsys.readouterr()
    assert out == " Paris\n"


PRESS_PROMPT = (
    "A press scores each cached token per layer and per head, keeps the tokens attention "
    "needs and gives the other blocks back to the pool for other requests. " * 3
)


def test_generate_with_a_kv_press(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", PRESS_PROMPT, *GREEDY, "--kv-press", "snapkv:0.5,window=16"]) == 0
    stats = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.search(r"kv cache peak ([\d.]+) MiB, ([\d.]+) MiB after the press", stats)
    assert found, stats
    # 91 tokens (6 blocks) at the press, 45 kept (3 blocks): half the bytes
    assert float(found.group(2)) == pytest.approx(float(found.group(1)) / 2, abs=0.01)
    assert main(["generate", PRESS_PROMPT, *GREEDY, "--kv-press", "tova,budget=32"]) == 0
    stats = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.search(r"kv cache peak ([\d.]+) MiB, ([\d.]+) MiB after the press", stats)
    assert found, stats  # 32 of the 91 tokens kept: 2 blocks of the 6
    assert float(found.group(2)) == pytest.approx(float(found.group(1)) / 3, abs=0.01)
    assert main(["generate", PRESS_PROMPT, *GREEDY]) == 0  # a plain run says nothing of it
    assert "after the press" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-press", "h2o:0.5"], "unknown kv press 'h2o'"),
        (["--kv-press", "tova:0.5,budget=64"], "takes no ratio (got 0.5)"),
        (["--kv-press", "tova"], "tova needs a budget"),
        (["--kv-press", "knorm:0.5,budget=64"], "knorm takes no budget"),
        (
            ["--kv-press", "tova,budget=8"],
            "one block of 16 (each press frees a block): give budget >= 16",
        ),
        (["--kv-press", "knorm:1"], "ratio must be in [0, 1)"),
        (["--kv-press", "knorm"], "write METHOD:RATIO"),
        (["--kv-press", "knorm:0.5,depth=2"], "no option 'depth'"),
        # refused by the engine: a 5-token prompt and snapkv's window of 64
        (["--kv-press", "snapkv:0.5"], "snapkv scores the 5 tokens before the press"),
        (["--kv-press", "knorm:0.5", "--no-cache"], "runs without one (use_cache=False)"),
    ],
)
def test_generate_bad_kv_press_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "The capital of France is", *GREEDY, *argv]) == 2
    out, err = capsys.readouterr()
    assert (
        out == "" and err.strip().splitlines()[-1] == f"error: {err.split('error: ')[-1]}".strip()
    )
    assert message in err and "Traceback" not in err
