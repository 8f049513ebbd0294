"""`kvlm bench decode`: the table, the JSON, and the pure parts of the measuring code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvlm import LLM
from kvlm.bench.backends import BackendUnavailable, HFBackend, LlamaCppBackend, RunTiming
from kvlm.bench.common import BenchConfigError
from kvlm.bench.decode import prompt_ids
from kvlm.bench.decode_data import DecodeBenchConfig, DecodeBenchResult, Measurement
from kvlm.bench.machine import machine_info
from kvlm.bench.report import markdown, to_json
from kvlm.cli.main import main


def test_bench_decode_writes_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    argv = ["bench", "decode", "--new-tokens", "3,6", "--baselines", "no-cache", "--threads", "1"]
    assert main([*argv, "--no-cache-max-tokens", "3", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "| kvlm | 3 | 1 |" in out and "| kvlm-no-cache | 3 | 1 |" in out
    assert "| 3 | kvlm-no-cache |" in out  # the speedup row
    assert "| new tokens | kvlm tok/s | kvlm-no-cache tok/s | kvlm vs kvlm-no-cache |" in out
    assert "kvlm: 100%" in err  # the progress bar goes to stderr
    data = json.loads(path.read_text())
    assert set(data) >= {"config", "machine", "results", "speedups", "skipped", "notes", "traces"}
    assert data["config"]["new_tokens"] == [3, 6] and data["config"]["baselines"] == ["no-cache"]
    assert data["config"]["threads"] == 1 and data["machine"]["torch_num_threads"] == 1
    assert set(data["machine"]) >= {"cpu_count", "cpu_model", "cpu_flags", "torch_version", "date"}
    # One run of 6 tokens gives both lengths; no-cache times every step up to its cap of 3,
    # then steps 3 and 5 (one in 32, and the last), interpolating step 4.
    assert [(r["engine"], r["new_tokens"], r["interpolated_after"]) for r in data["results"]] == [
        ("kvlm", 3, None),
        ("kvlm", 6, None),
        ("kvlm-no-cache", 3, None),
        ("kvlm-no-cache", 6, 3),
    ]
    for result in data["results"]:
        assert set(result) >= {"wall_s", "tok_s", "decode_tok_s", "prefill_s", "runs"}
        assert result["runs"][0]["num_generated_tokens"] == result["new_tokens"]
        assert result["tok_s"] == pytest.approx(result["new_tokens"] / result["wall_s"])
    assert [(s["baseline"], s["num_new_tokens"]) for s in data["speedups"]] == [
        ("kvlm-no-cache", 3),
        ("kvlm-no-cache", 6),
    ]
    kvlm, no_cache = data["traces"]
    assert (kvlm["engine"], len(kvlm["step_s"]), kvlm["sampled"]) == ("kvlm", 6, [])
    assert len(no_cache["step_s"]) == 3 and [i for i, _ in no_cache["sampled"]] == [3, 5]
    assert data["skipped"] == []
    assert "kvlm-no-cache* | 6 |" in out and "one step in 32" in out
    assert data["prompt_token_ids"] and len(data["prompt_token_ids"][0]) == 16


def test_bench_decode_runs_the_cache_it_is_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bench.json"
    argv = ["bench", "decode", "--new-tokens", "4", "--baselines", "", "--threads", "1"]
    cache = ["--kv-cache-dtype", "int8", "--sliding-window", "8", "--attention-sinks", "4"]
    assert main([*argv, *cache, "--prompt-tokens", "24", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "kvlm int8 KV, window 8 + 4 sinks), prompt 24 tokens" in out
    assert "int8 KV, window 8 + 4 sinks)" in err  # the loading line
    config = json.loads(path.read_text())["config"]
    assert config["cache"] == {
        "kv_cache_dtype": "int8",
        "sliding_window": 8,
        "attention_sinks": 4,
        "kv_press": None,
    }


def test_bench_decode_presses_kvlms_prompts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bench.json"
    argv = ["bench", "decode", "--new-tokens", "4", "--baselines", "", "--threads", "1"]
    press = ["--kv-press", "snapkv:0.5,window=8", "--prompt-tokens", "32"]
    assert main([*argv, *press, "--json", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "kvlm press snapkv:0.5,window=8), prompt 32 tokens" in out
    config = json.loads(path.read_text())["config"]
    assert config["cache"]["kv_press"] == {
        "method": "snapkv",
        "ratio": 0.5,
        "window": 8,
        "num_sinks": 4,
        "num_future_positions": 512,
        "budget": None,  # tova's option: a ratio method has none
    }


@pytest.mark.parametrize(
    ("press", "message"),
    [
        ("h2o:0.5", "unknown kv press 'h2o'"),
        ("knorm:-1", "ratio must be in [0, 1)"),
        ("tova:0.5,budget=64", "takes no ratio"),
        ("snapkv:0.5", "its last 64 tokens, but prompt_tokens is 16: raise --prompt-tokens"),
    ],
)
def test_bench_decode_bad_kv_press_exits_2_before_loading(
    press: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "decode", "--new-tokens", "4", "--baselines", "", "--kv-press", press]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_prompt_ids_are_distinct_rows_of_exact_length(smollm2_llm: LLM) -> None:
    rows = prompt_ids(smollm2_llm.tokenizer, prompt_tokens=40, batch_size=3)
    assert [len(r) for r in rows] == [40, 40, 40]
    assert len({tuple(r[1:17]) for r in rows}) == 3  # no shared first block
    assert rows == prompt_ids(smollm2_llm.tokenizer, prompt_tokens=40, batch_size=3)  # fixed
    long = prompt_ids(smollm2_llm.tokenizer, prompt_tokens=300, batch_size=1)
    assert len(long[0]) == 300  # the passage repeats as needed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"new_tokens": ()}, "new_tokens"),
        ({"baselines": ("no-cache", "tgi")}, "unknown baseline(s) tgi"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"prompt_tokens": 0}, "prompt_tokens must be >= 1"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"no_cache_max_tokens": 0}, "no_cache_max_tokens must be >= 1"),
        ({"weight_format": "q2"}, "weight_format must be one of"),
    ],
)
def test_config_checks_itself(kwargs: dict, message: str) -> None:
    with pytest.raises(BenchConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DecodeBenchConfig(**kwargs)


def _result() -> DecodeBenchResult:
    config = DecodeBenchConfig(new_tokens=(8,), baselines=("no-cache", "hf"), repeats=3)
    result = DecodeBenchResult(config, machine_info(), [[1, 2, 3]])
    walls = {"kvlm": (1.0, 2.0, 9.0), "kvlm-no-cache": (4.0, 4.0, 4.0), "hf": (2.0, 2.0, 2.0)}
    for engine, runs in walls.items():
        timings = tuple(RunTiming(w, 8, 0.1, 8 / w) for w in runs)
        result.measurements.append(Measurement(engine, 8, 1, timings))
    return result


def test_measurement_medians_and_speedups() -> None:
    result = _result()
    ours = result.find("kvlm", 8)
    assert ours is not None
    assert ours.wall_s == 2.0 and ours.tok_s == 4.0  # the median run, not the mean
    speedups = {s.baseline: s for s in result.speedups()}
    assert speedups["kvlm-no-cache"].tok_s == pytest.approx(2.0)
    assert speedups["hf"].tok_s == pytest.approx(1.0)
    assert speedups["hf"].decode_tok_s == pytest.approx(1.0)


def test_report_table_and_json() -> None:
    result = _result()
    table = markdown(result)
    assert "| kvlm | 8 | 1 | 2.00 | 4.0 | 4.0 | 0.100 |" in table
    assert "| 8 | kvlm-no-cache | 2.00× | 2.00× |" in table
    assert "torch" in table and "threads" in table
    data = json.loads(json.dumps(to_json(result)))  # plain JSON values only
    assert len(data["results"][0]["runs"]) == 3


def test_missing_optional_libraries_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(BackendUnavailable, match="transformers not installed"):
        HFBackend(Path("model.gguf"), "float32")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(BackendUnavailable, match="llama_cpp module not importable"):
        LlamaCppBackend(Path("model.gguf"), num_ctx=64, num_threads=1)


def test_kvlm_import_does_not_import_transformers() -> None:
    modules = "kvlm, kvlm.cli.main, kvlm.bench.decode, kvlm.bench.report, kvlm.bench.serve"
    code = f"import sys, {modules}; print('transformers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
