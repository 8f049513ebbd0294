"""`kvlm serve` as a real process: prints its URL, answers, stops on Ctrl-C; bad options fail
fast with `error: ...` and exit code 2, before any model loads."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kvlm.cli.main import main
from kvlm.engine.config import EngineConfig
from kvlm.engine.weight_format import resolve_weight_format

KVLM = [sys.executable, "-m", "kvlm.cli.main"]


def test_serve_prints_its_url_serves_and_stops_on_ctrl_c() -> None:
    cmd = [*KVLM, "serve", "--port", "0", "--api-key", "k", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The banner is printed once the model is loaded (after the kernels' stderr lines).
        lines = [proc.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("kvlm: serving"):
            lines.append(proc.stdout.readline())
        line = lines[-1]
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        assert match, "".join(lines)
        weights = resolve_weight_format("auto", "smollm2", EngineConfig().torch_device)
        assert f"'tiny' ({weights} weights) at" in line  # the format "auto" resolved to
        url = match.group(1)
        deadline = time.monotonic() + 30
        while True:  # uvicorn starts right after the line is printed
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server never answered /health"
                time.sleep(0.1)
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}, timeout=5)
        assert [m["id"] for m in models.json()["data"]] == ["tiny"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--port", "70000"], ["--port", "70000"]),
        (["--max-num-seqs", "0"], ["--max-num-seqs", "0"]),
        (["--max-request-bytes", "0"], ["--max-request-bytes", "0"]),
        (["--kv-cache-memory", "lots"], ["'lots'"]),
        (["--max-model-len", "1"], ["max_model_len", "1"]),
    ],
)
def test_bad_serve_options_fail_before_loading(
    argv: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for word in words:
        assert word in err


def test_port_in_use_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    from kvlm.server.launch import bind_socket

    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        taken.close()


def test_serve_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = ("--host", "--port", "--api-key", "--served-model-name", "--max-num-seqs")
    for option in (*options, "--max-request-bytes"):
        assert option in out
