"""`--help` on every command prints usage and exits 0."""

from __future__ import annotations

import pytest

from kvlm.cli.main import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "generate"),
        (["generate"], "--max-tokens"),
        (["chat"], "/exit"),
        (["bench"], "decode"),
        (["bench", "decode"], "--new-tokens"),
    ],
)
def test_help(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvlm")
    assert expected in out
