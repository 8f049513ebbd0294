"""`kvlm bench all`: the whole suite at smoke sizes, end to end, and its bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlm.cli.main import main


@pytest.mark.slow
def test_bench_all_smoke_writes_everything(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "all", "--smoke", "--threads", "1", "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    # First, after the kernels' `kvlm: ...` lines (resolving --weight-format auto loads them).
    assert "estimated" in [line for line in err.splitlines() if not line.startswith("kvlm: ")][0]
    summary = json.loads((out / "suite.json").read_text())
    for name in summary["files"]:
        assert (out / name).stat().st_size > 0
    decode = json.loads((out / "decode.json").read_text())
    assert {m["engine"] for m in decode["results"]} >= {"kvlm", "kvlm-no-cache", "hf"}
    assert "| new tokens | kvlm tok/s |" in stdout


def test_bench_all_refuses_a_file_as_out(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["bench", "all", "--out", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
