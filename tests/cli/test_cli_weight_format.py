"""`--weight-format auto`, the default: generate's stats line, eval's JSON and the benchmarks'
configs name the format it resolved to, never "auto"."""

from __future__ import annotations

import json

import pytest

from kvlm.bench.decode_data import DecodeBenchConfig
from kvlm.bench.prefix import PrefixBenchConfig
from kvlm.bench.serve import ServeBenchConfig
from kvlm.cli.main import main
from kvlm.engine.config import EngineConfig
from kvlm.engine.weight_format import resolve_weight_format


@pytest.fixture(scope="module")
def resolved() -> str:
    return resolve_weight_format("auto", "smollm2", EngineConfig().torch_device)


def test_generate_stats_name_what_auto_resolved_to(capsys, resolved: str) -> None:
    assert main(["generate", "Hi", "--temperature", "0", "--max-tokens", "2"]) == 0
    stats = capsys.readouterr().err.strip().splitlines()[-1]
    assert stats.startswith("[kvlm] ttft") and stats.endswith(f" | {resolved} weights"), stats


def test_eval_records_the_resolved_format(capsys, resolved: str) -> None:
    assert main(["eval", "ppl", "--json", "--max-tokens", "16", "--chunk-size", "32"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["weight_format"] == resolved


def test_bench_configs_record_the_resolved_format(resolved: str) -> None:
    for config in (DecodeBenchConfig(), ServeBenchConfig(), PrefixBenchConfig()):
        assert config.weight_format == resolved
        assert type(config)(weight_format="float").weight_format == "float"


def test_help_names_auto_as_the_default(capsys) -> None:
    for command in (["generate"], ["bench", "decode"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "default auto: gguf for a .gguf model on a CPU with kvlm's AVX2" in help_text
