"""Path selection: KVLM_KERNELS forces a path, one stderr line says which, no compiler -> torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvlm.kernels import available_paths

_PROBE = (
    "import torch; from kvlm.kernels import kernel_status; "
    "from kvlm.kernels.matmul import quantize_activations_reference; "
    "print(kernel_status().path)"
)


def _run(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("path", ["avx512", "avx2", "ref", "torch"])
def test_env_var_forces_each_available_path(path: str) -> None:
    if path not in available_paths():
        pytest.skip(f"this CPU does not run the {path} kernels")
    result = _run(KVLM_KERNELS=path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == path
    lines = [line for line in result.stderr.splitlines() if "quantized matmuls use" in line]
    assert len(lines) == 1 and f"KVLM_KERNELS={path}" in lines[0]


def test_forcing_a_path_the_cpu_lacks_says_what_runs() -> None:
    missing = [p for p in ("avx512", "avx2") if p not in available_paths()]
    if not missing:
        pytest.skip("this CPU runs every kernel path")
    result = _run(KVLM_KERNELS=missing[0])
    assert result.returncode != 0 and "this CPU runs only" in result.stderr


def test_without_a_compiler_the_torch_path_runs(tmp_path) -> None:
    result = _run(KVLM_KERNELS_CACHE=str(tmp_path), CXX="/nonexistent/c++")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    assert "no C++ compiler" in result.stderr
