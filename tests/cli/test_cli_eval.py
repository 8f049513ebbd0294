"""`kvlm eval ppl`: perplexity through the cache, its JSON line, and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvlm.cli.main import main


def _ppl(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["eval", "ppl", "--json", *argv]) == 0
    out, err = capsys.readouterr()
    assert "ppl" in err  # the progress bar
    return json.loads(out.strip().splitlines()[-1])


def test_chunks_read_back_from_the_cache_give_the_same_perplexity(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Chunks of 16 read 15 earlier chunks' K/V from the cache; one chunk of 256 reads none.
    In float32 the two agree to rounding: the cache returns exactly what was computed."""
    float_weights = ["--weight-format", "float"]  # on gguf ones a chunk's size moves rounding
    chunked = _ppl(["--max-tokens", "256", "--chunk-size", "16", *float_weights], capsys)
    whole = _ppl(["--max-tokens", "256", "--chunk-size", "256", *float_weights], capsys)
    assert chunked["num_tokens"] == whole["num_tokens"] == 256
    assert chunked["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-4)
    assert 1 < whole["perplexity"] < 100  # English documentation, a competent model


def test_quantized_and_windowed_caches_cost_what_they_should(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = _ppl(["--max-tokens", "256", "--chunk-size", "32"], capsys)
    int8 = _ppl(["--max-tokens", "256", "--chunk-size", "32", "--kv-cache-dtype", "int8"], capsys)
    assert int8["kv_cache_dtype"] == "int8"
    assert int8["kv_bytes_per_token"] * 3.7 < base["kv_bytes_per_token"]  # 68 vs 256 B a head
    assert abs(math.log(int8["perplexity"] / base["perplexity"])) < 0.01
    window = _ppl(["--max-tokens", "256", "--chunk-size", "32", "--sliding-window", "32"], capsys)
    assert window["perplexity"] > base["perplexity"]  # tokens lose context the cache kept


def test_text_file_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = _ppl(["--text", str(text), "--max-tokens", "64"], capsys)
    assert result["num_tokens"] == 64 and result["perplexity"] < 10  # a repeated sentence
    assert main(["eval", "ppl", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
