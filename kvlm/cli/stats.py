"""The one-line summaries the commands print on stderr after each generation."""

from __future__ import annotations

from dataclasses import dataclass

from kvlm.engine.engine import LLMEngine
from kvlm.engine.request import RequestMetrics


@dataclass(frozen=True)
class KVUsage:
    """The most KV bytes one request held at once, and the format and pool they came from."""

    peak_bytes: int
    kv_format: str
    pool_bytes: int
    pressed_bytes: int | None = None  # with a KV press: what it held right after the press


@dataclass(frozen=True)
class TurnStats:
    ttft_s: float | None
    decode_tok_s: float | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    kv: KVUsage | None  # None in no-cache mode
    weight_format: str | None = None  # what the engine ran ("auto" resolved); None: not shown

    @property
    def num_prefilled_tokens(self) -> int:
        """Prompt tokens computed this request (the rest came from the prefix cache)."""
        return self.num_prompt_tokens - self.num_cached_tokens


def kv_usage(engine: LLMEngine, metrics: RequestMetrics) -> KVUsage | None:
    if engine.kv_cache is None:
        return None
    formats = ", ".join(sorted({spec.kv_format for spec in engine.kv_specs}))
    return KVUsage(
        metrics.kv_peak_bytes, formats, engine.kv_cache_bytes_total(), metrics.kv_pressed_bytes
    )


def turn_stats(engine: LLMEngine, metrics: RequestMetrics) -> TurnStats:
    return TurnStats(
        ttft_s=metrics.ttft_s,
        decode_tok_s=metrics.decode_tok_s,
        num_prompt_tokens=metrics.num_prompt_tokens,
        num_cached_tokens=metrics.num_cached_tokens,
        num_generated_tokens=metrics.num_generated_tokens,
        kv=kv_usage(engine, metrics),
        weight_format=engine.config.weight_format,
    )


def format_bytes(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} tok/s"


def format_generate_stats(stats: TurnStats) -> str:
    """E.g. `[kvlm] ttft 210 ms | decode 41.3 tok/s | prompt 6 tok | generated 64 tok | ...`,
    ending with the weight format when the stats name it (`| gguf weights`); a pressed
    request's KV reads `kv cache peak 96.00 KiB, 48.00 KiB after the press (...)`."""
    if stats.kv is None:
        kv = "no cache (every step recomputes the whole sequence)"
    else:
        pressed = stats.kv.pressed_bytes
        after = "" if pressed is None else f", {format_bytes(pressed)} after the press"
        kv = (
            f"kv cache peak {format_bytes(stats.kv.peak_bytes)}{after} ({stats.kv.kv_format}, "
            f"pool {format_bytes(stats.kv.pool_bytes)})"
        )
    weights = "" if stats.weight_format is None else f" | {stats.weight_format} weights"
    return (
        f"[kvlm] ttft {_seconds(stats.ttft_s)} | decode {_rate(stats.decode_tok_s)} | "
        f"prompt {stats.num_prompt_tokens} tok | generated {stats.num_generated_tokens} tok | "
        f"{kv}{weights}"
    )


def format_chat_stats(turn: int, stats: TurnStats) -> str:
    """E.g. `[turn 2] prompt 83 tok | reused from cache 64 | prefilled 19 | ttft ... | ...`."""
    cache = "no cache" if stats.kv is None else f"reused from cache {stats.num_cached_tokens}"
    return (
        f"[turn {turn}] prompt {stats.num_prompt_tokens} tok | {cache} | "
        f"prefilled {stats.num_prefilled_tokens} | generated {stats.num_generated_tokens} | "
        f"ttft {_seconds(stats.ttft_s)} | decode {_rate(stats.decode_tok_s)}"
    )
