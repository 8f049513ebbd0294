"""What every benchmark shares: its settings error, the threads check, the weight format that
runs, a skipped engine."""

from __future__ import annotations

from dataclasses import dataclass

from kvlm.engine.config import EngineConfig
from kvlm.engine.weight_format import resolve_weight_format


class BenchConfigError(ValueError):
    """A benchmark setting that cannot work; the message says which and why."""


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise BenchConfigError(f"threads must be >= 1, got {threads}")


def resolved_weight_format(weight_format: str, model: str, dtype: str = "float32") -> str:
    """`weight_format` with "auto" resolved as the benchmark's engines (on the default device)
    will resolve it, so a config, its tables and its JSON name the format that ran."""
    return resolve_weight_format(weight_format, model, EngineConfig().torch_device, dtype)


@dataclass(frozen=True)
class Skipped:
    engine: str
    reason: str
