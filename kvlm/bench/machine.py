"""What a benchmark ran on: recorded beside every number it reports."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch


@dataclass(frozen=True)
class MachineInfo:
    date: str  # ISO 8601, UTC
    cpu_count: int | None
    cpu_model: str | None
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


def machine_info() -> MachineInfo:
    return MachineInfo(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu_count=os.cpu_count(),
        cpu_model=_cpu_model(),
        torch_version=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
        python_version=platform.python_version(),
        platform=platform.platform(),
        kvlm_version=_version("kvlm"),
        transformers_version=_version("transformers"),
        load_average=load_average(),
    )
