"""The servers `kvlm bench serve` drives: `kvlm serve` and llama.cpp's `llama-server`.

Each runs as a child process on a free local port, with the same GGUF and thread count, and is
ready once its `/health` answers 200. `llama-server` is optional: when no binary is found the
baseline is skipped with a line saying where it was looked for.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kvlm.bench.backends import BackendUnavailable
from kvlm.bench.machine import kernel_note

# Where ../shared/tools/build-llama-server.sh (and `DEST=... ` builds like it) put the binary.
LLAMA_SERVER_DIR = Path.home() / ".cache" / "kvlm-llamacpp"
START_TIMEOUT_S = 300.0


class ServerError(RuntimeError):
    """A benchmarked server did not start, or died; the message holds its last output."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server; `{port}` in `argv` is replaced by the port chosen."""

    name: str
    argv: tuple[str, ...]
    version: str


def kvlm_server(
    model: str, dtype: str, weight_format: str, threads: int, max_num_seqs: int
) -> ServerSpec:
    argv = (
        sys.executable, "-m", "kvlm.cli.main", "serve",
        "--model", model, "--dtype", dtype, "--weight-format", weight_format,
        "--threads", str(threads), "--max-num-seqs", str(max_num_seqs),
        "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
    )  # fmt: skip
    note = kernel_note(weight_format)
    return ServerSpec("kvlm", argv, "kvlm serve (this checkout)" + (f"; {note}" if note else ""))


def find_llama_server(explicit: Path | None) -> Path:
    """`explicit`, else `llama-server` on PATH, else the build script's folder."""
    if explicit is not None:
        if not explicit.is_file() or not os.access(explicit, os.X_OK):
            raise BackendUnavailable(f"--llama-server {explicit} is not an executable file")
        return explicit
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    built = LLAMA_SERVER_DIR / "llama-server"
    if built.is_file():
        return built
    raise BackendUnavailable(
        f"llama-server not found on PATH or in {LLAMA_SERVER_DIR}; build llama.cpp's "
        "llama-server (the project's tools/build-llama-server.sh does) or pass --llama-server"
    )


def llama_server(
    binary: Path, model_path: Path, threads: int, slots: int, ctx_per_slot: int
) -> ServerSpec:
    """Continuous batching over `slots` slots of `ctx_per_slot` tokens each (llama-server
    divides its `-c` context between the slots)."""
    argv = (
        str(binary), "-m", str(model_path), "--host", "127.0.0.1", "--port", "{port}",
        "-t", str(threads), "-tb", str(threads), "-np", str(slots),
        "-c", str(slots * ctx_per_slot), "--cont-batching",
    )  # fmt: skip
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        version = (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise BackendUnavailable(f"{binary} --version failed: {e}") from e
    return ServerSpec("llama-server", argv, f"llama.cpp {version.removeprefix('version: ')}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A started server; use as a context manager so it is always stopped."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        argv = [a.replace("{port}", str(port)) for a in spec.argv]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ServerError(f"{self.spec.name} exited at start-up: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while it loads the model
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"{self.spec.name} not ready in {START_TIMEOUT_S:.0f} s")

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-800:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
