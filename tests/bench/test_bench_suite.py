"""`kvlm bench all`'s plumbing: every JSON, table and PNG written, from quick stand-in results.

The stand-ins are real result objects with made-up timings (the memory benchmark runs for real,
calculator only); the models' own runs are covered by the CLI tests and the slow smoke run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlm.bench import suite
from kvlm.bench.backends import RunTiming
from kvlm.bench.decode_data import DecodeBenchResult, Measurement, Trace
from kvlm.bench.machine import machine_info
from kvlm.bench.memory import MemoryBenchConfig, run_memory_bench
from kvlm.bench.prefix import PrefixBenchResult, PrefixTTFT, StreamsResult
from kvlm.bench.serve import ConcurrencyResult, Latency, ServeBenchResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode(config) -> DecodeBenchResult:
    result = DecodeBenchResult(config, machine_info(), [[1, 2]])
    for engine, step in (("kvlm", 0.04), ("kvlm-no-cache", 0.1)):
        run = RunTiming.from_token_times([step * (i + 1) for i in range(8)], 1)
        for n in config.new_tokens:
            result.measurements.append(Measurement(engine, n, 1, (run.truncated(n, 1),)))
        result.traces.append(Trace.from_runs(engine, config.prompt_tokens, [run]))
    return result


def _serve(config) -> ServeBenchResult:
    result = ServeBenchResult(config, machine_info(), threads=2, servers={"kvlm": "test"})
    for n in config.streams:
        latency = Latency(0.1 * n, 0.2 * n, 0.3 * n)
        result.results.append(ConcurrencyResult("kvlm", n, 1.0, 4 * n, latency, latency))
    return result


def _prefix(config) -> PrefixBenchResult:
    result = PrefixBenchResult(config, machine_info())
    result.streams = [StreamsResult(n, 1.0, 4 * n, 0.1) for n in config.streams]
    result.prefixes = [PrefixTTFT(n, n / 100, 0.05, n) for n in config.prefix_tokens]
    return result


@pytest.fixture
def quick_suite(monkeypatch: pytest.MonkeyPatch) -> suite.SuiteConfig:
    monkeypatch.setattr(suite, "run_decode_bench", lambda c, progress: _decode(c))
    monkeypatch.setattr(suite.serve, "run_serve_bench", lambda c, progress: _serve(c))
    monkeypatch.setattr(suite.prefix, "run_prefix_bench", lambda c, progress: _prefix(c))
    config = suite.default_suite("smollm2", 2, "float", "float32", smoke=True)
    memory = MemoryBenchConfig(max_tokens=256, step=64, measured_tokens=(), threads=2)
    return suite.SuiteConfig(config.decode, config.serve, config.prefix, memory)


def test_suite_writes_json_tables_and_plots(quick_suite: suite.SuiteConfig, tmp_path: Path):
    lines: list[str] = []
    summary = suite.run_suite(quick_suite, tmp_path / "out", lines.append)
    out = tmp_path / "out"
    names = ("decode", "serve", "prefix", "memory")
    for name in names:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["benchmark"] == name
        assert {"cpu_model", "cpu_flags", "torch_num_threads"} <= set(data["machine"])
        assert data["config"]["threads"] == 2
        assert (out / f"{name}.md").read_text().startswith(("|", "##"))
    pngs = [f for f in summary["files"] if f.endswith(".png")]
    assert len(pngs) == 5
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC and (out / png).stat().st_size > 10_000
    written = json.loads((out / "suite.json").read_text())
    assert set(written["elapsed_s"]) == set(written["estimate_s"]) == set(names)
    assert any(line.startswith("== decode (estimate") for line in lines)


def test_memory_curve_gqa_and_formats() -> None:
    result = run_memory_bench(MemoryBenchConfig(max_tokens=512, step=128, measured_tokens=()))
    at_512 = {p.technique: p.kv_bytes for p in result.points if p.num_tokens == 512}
    plain, mha = at_512["plain (float32, GQA)"], at_512["multi-head equivalent (float32)"]
    model = result.model
    assert mha == plain * model.num_heads // model.num_kv_heads  # SmolLM2: 9 heads, 3 KV heads
    assert at_512["int8"] < plain / 3 and at_512["int4"] < at_512["int8"]
    assert at_512["sliding window 512"] == plain  # the window is not full yet
    assert all(p.source == "calculator" for p in result.points)


def test_full_suite_estimate_fits_twenty_minutes() -> None:
    config = suite.default_suite("smollm2", None, "float", "float32")
    estimate = suite.estimate_s(config)
    assert sum(estimate.values()) < 15 * 60  # leaves room for a slower machine
    assert config.decode.new_tokens == (32, 128, 512, 1024)
    assert config.serve.streams == (1, 4, 16, 64)
