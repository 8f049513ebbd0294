"""`kvlm chat --session FILE` resumes a conversation with its K/V restored (each command starts
with an empty prefix cache, as a new process would); `--kv-offload` values are checked before
any model loads."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from kvlm.cli.main import main

CHAT = ["chat", "--temperature", "0", "--max-tokens", "8", "--system", "Be brief. " * 30]


def _chat(
    lines: str, path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, list[tuple[int, int]]]:
    """Exit code, stderr, and (prompt tokens, reused tokens) per turn."""
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code = main([*CHAT, "--session", str(path)])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    turns = re.findall(r"prompt (\d+) tok \| reused from cache (\d+)", err)
    return code, err, [(int(p), int(r)) for p, r in turns]


def test_chat_resumes_a_saved_session_without_recomputing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chat.kvs"
    code, _, [(first_prompt, _)] = _chat("Name a colour.\n", path, capsys, monkeypatch)
    assert code == 0 and path.is_file()
    code, err, [(prompt, reused)] = _chat("Another one.\n", path, capsys, monkeypatch)
    assert code == 0
    restored = int(re.search(r"K/V of (\d+) of (\d+) tokens restored", err).group(1))
    assert "[session" in err and "3 messages" in err  # system, user, assistant
    assert prompt > first_prompt  # the saved conversation was sent again ...
    assert reused >= restored > first_prompt - 16  # ... and came from the restored blocks


def test_chat_with_a_damaged_session_warns_and_recomputes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chat.kvs"
    _chat("Name a colour.\n", path, capsys, monkeypatch)
    path.write_bytes(path.read_bytes()[:-10])
    code, err, [(_, reused)] = _chat("Another one.\n", path, capsys, monkeypatch)
    assert code == 0
    assert re.search(r"warning: .* is cut short: .*; recomputing its \d+ tokens", err)
    assert reused == 0


def test_chat_with_a_file_that_is_no_session_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a session")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main([*CHAT, "--session", str(path)]) == 2
    _, err = capsys.readouterr()
    assert "is not a kvlm session file" in err and "move the file away" in err
    assert path.read_text() == "not a session"  # never overwritten


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "--kv-offload", "ram:lots"], "cannot read 'ram:lots'"),
        (["chat", "--kv-offload", "ssd:1G"], "unknown tier 'ssd:1G'"),
        (["serve", "--kv-offload", "redis://nohost"], "needs a host and a port"),
        (["generate", "hi", "--kv-offload", "ram:1G", "--no-cache"], "needs the KV cache"),
        (["chat", "--session", "/no/such/folder/x.kvs"], "its folder does not exist"),
        (["serve", "--session-dir", "/no/such/folder"], "is not a folder"),
    ],
)
def test_bad_offload_and_session_options(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and message in err, err
