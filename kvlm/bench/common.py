"""What every benchmark shares: its settings error, the threads check, a skipped engine."""

from __future__ import annotations

from dataclasses import dataclass


class BenchConfigError(ValueError):
    """A benchmark setting that cannot work; the message says which and why."""


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise BenchConfigError(f"threads must be >= 1, got {threads}")


@dataclass(frozen=True)
class Skipped:
    engine: str
    reason: str
