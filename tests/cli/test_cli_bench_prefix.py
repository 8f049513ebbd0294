"""`kvlm bench prefix`: prefix-cache TTFT by length, hit rate, concurrency and KV waste."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlm.cli.main import main


def test_bench_prefix_reports_every_measure(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    path = tmp_path / "prefix.json"
    argv = ["bench", "prefix", "--streams", "1,3", "--new-tokens", "4", "--threads", "1"]
    assert main([*argv, "--prefix-tokens", "48,96", "--json", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "| 1 | " in out and "| 3 | " in out
    assert "| 48 | " in out and "| 96 | " in out
    data = json.loads(path.read_text())
    assert data["config"]["threads"] == 1 and data["machine"]["torch_num_threads"] == 1
    assert [s["num_streams"] for s in data["streams"]] == [1, 3]
    assert [s["generated_tokens"] for s in data["streams"]] == [4, 12]
    assert [p["prefix_len"] for p in data["prefixes"]] == [48, 96]
    # The whole prefix comes back from the cache: 3 and 6 full blocks of 16.
    assert [p["cached_tokens"] for p in data["prefixes"]] == [48, 96]
    # 8 requests share 96 prefix tokens; every request after the first reuses all 6 blocks
    assert data["hit_rate"] == pytest.approx(7 * 96 / sum(96 + n for n in _question_lens()))
    assert 0.0 < data["waste_streams"] < 1.0 and 0.0 <= data["waste_shared"] < 1.0


def _question_lens() -> list[int]:
    from kvlm.bench.prefix import QUESTIONS
    from kvlm.loading import resolve_model_path
    from kvlm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(resolve_model_path("smollm2"))
    return [len(tok.encode("\n\n" + q, add_special_tokens=False)) for q in QUESTIONS]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--streams", "0"], "error: streams need values >= 1"),
        (["--prefix-tokens", "8"], "error: prefix_tokens must be >= 16"),
        (["--block-size", "12"], "error: block_size must be a power of two"),
        (["--threads", "0"], "error: threads must be >= 1"),
    ],
)
def test_bench_prefix_rejects_bad_values(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "prefix", *argv]) == 2
    assert message in capsys.readouterr().err
