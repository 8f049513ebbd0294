"""`kvlm bench serve`: a real `kvlm serve` child process driven over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlm.cli.main import main


def test_bench_serve_over_http_skips_a_missing_baseline(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "serve.json"
    argv = ["bench", "serve", "--streams", "1,2", "--new-tokens", "3", "--threads", "1"]
    missing = tmp_path / "no-llama-server"
    argv += ["--baselines", "llama-server", "--llama-server", str(missing), "--json", str(path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    skip_lines = [line for line in err.splitlines() if line.startswith("skipping llama-server")]
    assert skip_lines == [
        f"skipping llama-server: --llama-server {missing} is not an executable file"
    ]
    assert "| 1 | " in out and "| 2 | " in out and "kvlm TTFT p50 / p99 s" in out
    data = json.loads(path.read_text())
    assert data["threads"] == 1 and data["config"]["threads"] == 1
    assert [(r["server"], r["num_streams"], r["generated_tokens"]) for r in data["results"]] == [
        ("kvlm", 1, 3),
        ("kvlm", 2, 6),
    ]
    for r in data["results"]:
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p90"] <= r["ttft_s"]["p99"]
        assert r["inter_token_s"]["p50"] > 0 and r["tok_s"] == pytest.approx(
            r["generated_tokens"] / r["wall_s"]
        )
    assert [s["engine"] for s in data["skipped"]] == ["llama-server"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--streams", "0"], "error: streams need values >= 1"),
        (["--baselines", "vllm"], "error: unknown serve baseline(s) vllm"),
        (["--threads", "0"], "error: threads must be >= 1"),
    ],
)
def test_bench_serve_rejects_bad_values(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "serve", *argv]) == 2
    assert message in capsys.readouterr().err
