"""`kvlm bench serve`: concurrency, prefix-cache TTFT, hit rate and KV waste, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlm.cli.main import main


def test_bench_serve_reports_every_measure(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    path = tmp_path / "serve.json"
    argv = ["bench", "serve", "--streams", "1,3", "--new-tokens", "4", "--prefix-tokens", "96"]
    assert main([*argv, "--json", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "| 1 | " in out and "| 3 | " in out
    assert "TTFT speedup from the prefix cache" in out
    data = json.loads(path.read_text())
    assert [s["num_streams"] for s in data["streams"]] == [1, 3]
    assert [s["generated_tokens"] for s in data["streams"]] == [4, 12]
    assert data["prefix_len"] == 96
    assert data["cached_tokens"] == 96  # the whole prefix: 6 full blocks of 16
    # 8 requests share 96 prefix tokens; every request after the first reuses all 6 blocks
    assert data["hit_rate"] == pytest.approx(7 * 96 / sum(96 + n for n in _question_lens()))
    assert 0.0 < data["waste_streams"] < 1.0 and 0.0 <= data["waste_shared"] < 1.0


def _question_lens() -> list[int]:
    from kvlm.bench.serve import QUESTIONS
    from kvlm.loading import resolve_model_path
    from kvlm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(resolve_model_path("smollm2"))
    return [len(tok.encode("\n\n" + q, add_special_tokens=False)) for q in QUESTIONS]


def test_bench_serve_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--streams", "0"]) == 2
    assert "error: --streams" in capsys.readouterr().err
