"""`--prefix-adapter NAME=PATH` on generate, chat and serve."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from peft_adapters import write_adapter

from kvlm import SamplingParams
from kvlm.cli import common
from kvlm.cli.main import main
from kvlm.loading.gguf_loader import read_header

GREEDY = ["--temperature", "0", "--max-tokens", "8", "--ignore-eos"]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapter(smollm2_path, tmp_path_factory) -> Path:
    config = read_header(smollm2_path)[0]
    return write_adapter(tmp_path_factory.mktemp("cli") / "poet", config, 20, seed=7)


def _fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


def test_generate_matches_the_offline_api(adapter, capsys):
    assert main(["generate", PROMPT, "--prefix-adapter", f"poet={adapter}", *GREEDY]) == 0
    out = capsys.readouterr().out
    # the engine the command used (tests/cli/conftest.py caches one per configuration)
    llm = common.LLM(model="smollm2", prefix_adapters={"poet": str(adapter)})
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = llm.generate(PROMPT, params, prefix_adapter="poet")[0].outputs[0].text
    assert out == expected + "\n"
    assert expected != llm.generate(PROMPT, params)[0].outputs[0].text


def test_chat_runs_every_turn_with_the_adapter(adapter, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\nAnd again?\n"))
    assert main(["chat", "--prefix-adapter", f"poet={adapter}", *GREEDY]) == 0
    err = capsys.readouterr().err
    assert err.count("turn ") == 2 and "error" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", PROMPT, "--prefix-adapter", "poet"], "write NAME=PATH"),
        (["generate", PROMPT, "--prefix-adapter", "=x"], "write NAME=PATH"),
        (["serve", "--prefix-adapter", "a=x", "--prefix-adapter", "a=y"], "'a' is given twice"),
        (
            ["generate", PROMPT, "--prefix-adapter", "a=x", "--prefix-adapter", "b=y"],
            "generate and chat apply one adapter",
        ),
        (["chat", "--prefix-adapter", "a=x", "--session", "s.kvs"], "--session files do not"),
        (["serve", "--prefix-adapter", "a:b=x"], "without ':'"),
        (
            [
                *["generate", PROMPT, "--prefix-adapter", "a=x"],
                *["--sliding-window", "64", "--attention-sinks", "4"],
            ],
            "cannot run with attention_sinks",
        ),
    ],
)
def test_bad_adapter_options(argv, message, capsys):
    assert message in _fails_cleanly(argv, capsys)


def test_missing_adapter_folder(tmp_path, capsys):
    argv = ["generate", PROMPT, "--prefix-adapter", f"a={tmp_path / 'none'}", *GREEDY]
    assert "adapter_config.json is missing" in _fails_cleanly(argv, capsys)
