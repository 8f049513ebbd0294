"""What a benchmark ran on: recorded beside every number it reports."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

# Flags kept from /proc/cpuinfo: the vector extensions kernels are chosen by, not the ~100 others.
SIMD_FLAG_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c", "vnni", "asimd", "sve", "neon")


@dataclass(frozen=True)
class MachineInfo:
    date: str  # ISO 8601, UTC
    cpu_count: int | None
    cpu_model: str | None
    # The instruction-set flags that decide which kernels run (AVX2, AVX-512, VNNI, AMX, ...).
    cpu_flags: tuple[str, ...]
    torch_version: str
    torch_num_threads: int
    python_version: str
    platform: str
    kvlm_version: str | None
    transformers_version: str | None  # installed version; None if absent (never imported here)
    load_average: tuple[float, float, float] | None  # 1, 5, 15 min: other work on the machine


def _cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.processor() or None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def _cpu_flags() -> tuple[str, ...]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return ()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):  # x86, then ARM's name for the same line
            flags = line.split(":", 1)[1].split()
            return tuple(f for f in flags if f.startswith(SIMD_FLAG_PREFIXES))
    return ()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return None


def machine_line(mi: MachineInfo) -> str:
    """One sentence naming the CPU, its vector flags and the threads: numbers differ by them."""
    flags = ", ".join(f for f in mi.cpu_flags if f.startswith(("avx", "amx", "fma"))) or "none"
    return (
        f"Machine: {mi.cpu_count} CPUs ({mi.cpu_model}; flags {flags}), torch {mi.torch_version} "
        f"with {mi.torch_num_threads} threads, {mi.date}."
    )


def machine_info() -> MachineInfo:
    return MachineInfo(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu_count=os.cpu_count(),
        cpu_model=_cpu_model(),
        cpu_flags=_cpu_flags(),
        torch_version=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
        python_version=platform.python_version(),
        platform=platform.platform(),
        kvlm_version=_version("kvlm"),
        transformers_version=_version("transformers"),
        load_average=load_average(),
    )


def kernel_note(weight_format: str) -> str | None:
    """Which of kvlm's matmul kernels quantized weights run on here, and why; None for float
    weights (plain torch matmuls)."""
    if weight_format == "float":
        return None
    from kvlm.kernels import kernel_status  # loads (or builds) the C++ extension

    status = kernel_status()
    return f"kvlm's {weight_format} weights run on its {status.path} kernels ({status.reason})"
