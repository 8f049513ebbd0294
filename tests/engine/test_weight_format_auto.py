"""weight_format "auto" (the default): gguf where kvlm's SIMD kernels run a GGUF file on the
CPU, float everywhere else; explicit formats pass through; the engine keeps the resolved one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvlm import LLM
from kvlm.engine import weight_format
from kvlm.engine.config import EngineConfig, EngineConfigError
from kvlm.engine.weight_format import resolve_weight_format
from kvlm.kernels import available_paths
from kvlm.kernels.build import KernelStatus
from kvlm.loading import WEIGHT_FORMATS

CPU = torch.device("cpu")


def _force_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make the process's kernel path `path` (as KVLM_KERNELS would) for the resolution."""
    status = KernelStatus(path, f"forced {path} by the test", (path, "torch"))
    monkeypatch.setattr(weight_format, "kernel_status", lambda: status)


@pytest.mark.parametrize("path", ["avx512", "avx2"])
def test_gguf_on_the_cpu_with_simd_kernels_is_gguf(monkeypatch, path: str) -> None:
    _force_path(monkeypatch, path)
    assert resolve_weight_format("auto", "smollm2", CPU) == "gguf"
    assert resolve_weight_format("auto", "gemma3-270m", CPU) == "gguf"


@pytest.mark.parametrize("path", ["ref", "torch"])
def test_scalar_or_torch_kernels_mean_float(monkeypatch, path: str) -> None:
    """KVLM_KERNELS=ref / torch, no compiler, or a CPU without AVX2: dequantize at load."""
    _force_path(monkeypatch, path)
    assert resolve_weight_format("auto", "smollm2", CPU) == "float"


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_other_devices_mean_float(monkeypatch, device: str) -> None:
    _force_path(monkeypatch, "avx512")
    assert resolve_weight_format("auto", "smollm2", torch.device(device)) == "float"


def test_a_safetensors_folder_means_float(monkeypatch, tmp_path: Path) -> None:
    _force_path(monkeypatch, "avx512")
    assert resolve_weight_format("auto", str(tmp_path), CPU) == "float"


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_explicit_formats_are_kept_without_looking_at_the_model(monkeypatch, fmt: str) -> None:
    _force_path(monkeypatch, "torch")
    assert resolve_weight_format(fmt, "/no/such/model.gguf", CPU) == fmt
    assert resolve_weight_format(fmt, "/no/such/folder", torch.device("cuda")) == fmt


@pytest.mark.parametrize("forced", ["torch", "ref"])
def test_kvlm_kernels_env_var_means_float(forced: str) -> None:
    """The real KVLM_KERNELS in a fresh process (kernel_status is decided once per process)."""
    if forced not in available_paths():
        pytest.skip(f"this machine does not run the {forced} kernels")
    code = (
        "import torch; from kvlm.engine.weight_format import resolve_weight_format; "
        "print(resolve_weight_format('auto', 'smollm2', torch.device('cpu')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "KVLM_KERNELS": forced},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "float"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_other_dtypes_mean_float(monkeypatch, dtype: str) -> None:
    # The kernels compute in float32; a bf16/fp16 engine on GGUF weights dequantizes at load
    _force_path(monkeypatch, "avx2")
    assert resolve_weight_format("auto", "smollm2", CPU, dtype) == "float"
    assert resolve_weight_format("auto", "smollm2", CPU, "float32") == "gguf"
    with pytest.raises(EngineConfigError, match="computes in float32 on kvlm's kernels"):
        EngineConfig(weight_format="gguf", dtype=dtype)


def test_auto_is_the_default_and_checked_like_the_others() -> None:
    assert EngineConfig().weight_format == "auto"
    EngineConfig(device="cuda", weight_format="auto")  # auto never asks a GPU for CPU kernels
    with pytest.raises(EngineConfigError, match="runs on kvlm's CPU kernels"):
        EngineConfig(device="cuda", weight_format="gguf")
    with pytest.raises(EngineConfigError, match="weight_format must be one of auto, float"):
        EngineConfig(weight_format="int3")


def test_the_engine_holds_the_resolved_format_and_fuses_decode_on_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="kvlm.engine.engine"):
        llm = LLM("smollm2", kv_cache_memory="16MiB", max_model_len=256)
    expected = resolve_weight_format("auto", "smollm2", CPU)
    assert llm.config is llm.engine.config
    assert llm.engine.config.weight_format == expected
    fused = llm.engine.runner.fused is not None
    assert fused == (expected == "gguf")
    said = [r.getMessage() for r in caplog.records if "not fused" in r.getMessage()]
    assert said == ([] if fused else ["decode steps run layer by layer, not fused: float weights"])
