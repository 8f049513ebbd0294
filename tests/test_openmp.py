"""kvlm.openmp: importing kvlm before torch makes torch's idle OpenMP threads sleep soon after
a parallel region instead of spinning ~8 ms (each case in a fresh interpreter: libgomp reads
its environment once, when it loads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# CPU time the OpenMP worker threads burn over 10 host gaps of 30 ms after a 2-thread op.
IDLE_CPU = """
import {first}, {second}, os, time, torch
torch.set_num_threads(2)
x = torch.randn(2000, 2000)
(x + 1).sum()
def cpu():
    me, total = str(threading.get_native_id()), 0
    for tid in os.listdir("/proc/self/task"):
        if tid != me:
            with open(f"/proc/self/task/{{tid}}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total * 1000 // os.sysconf("SC_CLK_TCK")
import threading
start = cpu()
for _ in range(10):
    (x + 1).sum()
    end = time.perf_counter() + 0.03
    while time.perf_counter() < end:
        pass
print(cpu() - start, kvlm.openmp.IDLE_THREADS_SLEEP, os.environ["GOMP_SPINCOUNT"])
"""


def _run(first: str, second: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = IDLE_CPU.format(first=first, second=second)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), out[1], out[2]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for 2 threads")
def test_idle_openmp_threads_sleep_when_kvlm_comes_first() -> None:
    spun_ms, sleeps, count = _run("kvlm", "torch")
    assert (sleeps, count) == ("True", "10000")
    # The op itself takes a few ms of the worker's time; spinning would add ~8 ms per gap.
    assert spun_ms < 40, f"OpenMP workers used {spun_ms} ms of CPU over 10 idle gaps"
    spun_ms, sleeps, _ = _run("torch", "kvlm")
    assert sleeps == "False"
    assert spun_ms > 60, f"libgomp's default should spin ~8 ms per gap, used {spun_ms} ms"
