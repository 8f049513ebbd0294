"""Bad input of every kind: one `error: ...` line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from kvlm.cli.main import main
from kvlm.loading import resolve_model_path


def _fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `kvlm ARGV`; assert exit 2 and one `error:` line; return that line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unknown_alias_lists_the_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails_cleanly(["generate", "hi", "--model", "no-such-model"], capsys)
    assert "'no-such-model' not found" in line
    assert "gemma3-270m" in line and "smollm2" in line


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _fails_cleanly(["generate", "hi", "--model", str(tmp_path / "gone.gguf")], capsys)
    assert "not found" in line


def test_truncated_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with resolve_model_path("smollm2").open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    line = _fails_cleanly(["generate", "hi", "--model", str(truncated)], capsys)
    assert "truncated.gguf" in line and "corrupt or truncated" in line


def test_truncated_gguf_in_chat(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 100)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    _fails_cleanly(["chat", "--model", str(junk)], capsys)


@pytest.mark.parametrize("prompt", ["", "-"])
def test_empty_prompt(
    prompt: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # '-' reads the prompt from stdin
    assert "prompt is empty" in _fails_cleanly(["generate", prompt], capsys)


def test_prompt_too_long(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "one two three four five six seven eight", "--max-model-len", "4"]
    line = _fails_cleanly(argv, capsys)
    assert "prompt has 8 tokens" in line and "context is 4" in line


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--temperature", "-1", "temperature must be >= 0"),
        ("--top-p", "0", "top_p must be in (0, 1]"),
        ("--top-k", "-2", "top_k must be >= 1"),
        ("--min-p", "2", "min_p must be in [0, 1]"),
        ("--repetition-penalty", "0", "repetition_penalty must be > 0"),
        ("--max-tokens", "0", "max_tokens must be >= 1"),
        ("--stop", "", "stop must contain only non-empty strings"),
        ("--temperature", "warm", "invalid float value"),
        ("--dtype", "int3", "invalid choice"),
        ("--kv-cache-memory", "lots", "cannot read 'lots' as a size"),
        ("--max-model-len", "1", "max_model_len must be >= 2"),
    ],
)
def test_invalid_option_values(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails_cleanly(["generate", "hi", option, value], capsys)
    assert message in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: command"),
        (["bench"], "required: bench"),
        (["bench", "decode", "--baselines", "vllm"], "unknown baseline(s) vllm"),
        (["bench", "decode", "--new-tokens", "0"], "new_tokens must be integers >= 1"),
        (["bench", "decode", "--new-tokens", "a,b"], "expected integers like 32,128,512"),
        (["bench", "decode", "--batch-size", "0"], "batch_size must be >= 1"),
        (["chat", "--temperature", "-1"], "temperature must be >= 0"),
    ],
)
def test_bad_command_lines(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _fails_cleanly(argv, capsys)


def test_console_entry_point_exit_code() -> None:
    """The real process: `python -m kvlm.cli.main` exits 2 with one line and no traceback."""
    cmd = [sys.executable, "-m", "kvlm.cli.main", "generate", "hi", "--model", "nope"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model 'nope' not found")
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_chat_turn_too_long_reports_and_goes_on(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhello again\n"))
    assert main(["chat", "--max-model-len", "4"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2  # both turns refused, each with one line; the loop went on
    assert all(line.startswith("error: prompt has ") for line in lines)
    assert "/reset starts a new conversation" in lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "hi", "--kv-cache-dtype", "int3"], "kv_cache_dtype must be one of"),
        (["generate", "hi", "--sliding-window", "0"], "sliding_window must be >= 1"),
        (["generate", "hi", "--attention-sinks", "4"], "needs a sliding_window"),
        (["serve", "--kv-cache-dtype", "int3"], "kv_cache_dtype must be one of"),
        (["eval", "ppl", "--attention-sinks", "4"], "needs a sliding_window"),
        (["eval", "ppl", "--max-tokens", "1"], "--max-tokens must be >= 2"),
    ],
)
def test_bad_cache_settings(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any model loads, on every command that takes them."""
    assert expected in _fails_cleanly(argv, capsys)


def test_fp8_refused_where_torch_lacks_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kvlm.engine.engine.fp8_supported", lambda device: False)
    line = _fails_cleanly(["generate", "hi", "--kv-cache-dtype", "fp8"], capsys)
    assert "fp8 needs float8_e4m3fn" in line and "use int8" in line
