"""Finding llama-server, and the line that says why it is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvlm.bench import servers
from kvlm.bench.backends import BackendUnavailable


def test_missing_llama_server_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(servers, "LLAMA_SERVER_DIR", tmp_path / "none")
    with pytest.raises(BackendUnavailable, match="llama-server not found on PATH or in"):
        servers.find_llama_server(None)


def test_explicit_llama_server_must_be_executable(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("not a program")
    with pytest.raises(BackendUnavailable, match="is not an executable file"):
        servers.find_llama_server(binary)
    binary.chmod(0o755)
    assert servers.find_llama_server(binary) == binary


def test_llama_server_gets_slots_threads_and_context(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\necho 'version: 1 (abc)'\n")
    binary.chmod(0o755)
    spec = servers.llama_server(binary, Path("m.gguf"), threads=2, slots=16, ctx_per_slot=128)
    argv = " ".join(spec.argv)
    assert "-t 2 -tb 2 -np 16 -c 2048" in argv and "--port {port}" in argv
    assert spec.version == "llama.cpp 1 (abc)"


def test_a_server_that_dies_at_start_up_is_reported_with_its_output(tmp_path: Path) -> None:
    script = tmp_path / "server"
    script.write_text("#!/bin/sh\necho 'error: unknown argument --port'\nexit 1\n")
    script.chmod(0o755)
    spec = servers.ServerSpec("llama-server", (str(script), "--port", "{port}"), "test")
    with pytest.raises(servers.ServerError, match="exited at start-up: error: unknown argument"):
        servers.RunningServer(spec, tmp_path / "log")


def test_quantized_weights_name_their_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvlm.kernels
    from kvlm.bench.machine import kernel_note
    from kvlm.kernels.build import KernelStatus

    status = KernelStatus("avx2", "the CPU has AVX2, not AVX-512 VNNI", ("avx2", "torch"))
    monkeypatch.setattr(kvlm.kernels, "kernel_status", lambda: status)
    assert kernel_note("float") is None
    note = "kvlm's gguf weights run on its avx2 kernels (the CPU has AVX2, not AVX-512 VNNI)"
    assert kernel_note("gguf") == note
    spec = servers.kvlm_server("smollm2", "float32", "gguf", threads=2, max_num_seqs=4)
    assert spec.version == f"kvlm serve (this checkout); {note}"
    assert "--weight-format gguf --threads 2 --max-num-seqs 4" in " ".join(spec.argv)
