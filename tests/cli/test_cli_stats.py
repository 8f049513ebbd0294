"""The stats lines, and the KV usage they report against what the pool really held."""

from __future__ import annotations

from kvlm import LLM, SamplingParams
from kvlm.cli.stats import (
    KVUsage,
    TurnStats,
    format_bytes,
    format_chat_stats,
    format_generate_stats,
    kv_usage,
)


def test_kv_usage_reports_the_requests_peak(smollm2_llm: LLM) -> None:
    """The peak is >= every reading taken between steps, and exactly the blocks it needed.

    14 prompt tokens + 20 outputs: the last step computes the 33rd token's K/V, which takes
    a third 16-token block inside that step (freed in the same step, so no reading sees it).
    """
    engine = smollm2_llm.engine
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    readings = []
    for output in smollm2_llm.stream({"prompt_token_ids": list(range(100, 114))}, params):
        if not output.finished:
            readings.append(engine.kv_cache_bytes_used())
    assert engine.kv_cache_bytes_used() == 0  # freed once finished
    usage = kv_usage(engine, output.metrics)
    assert usage is not None
    (spec,) = engine.kv_specs
    assert usage.peak_bytes == 3 * spec.page_nbytes
    assert usage.kv_format == "float32"
    assert usage.pool_bytes == engine.kv_cache_bytes_total()
    assert sorted(set(readings)) == [spec.page_nbytes, 2 * spec.page_nbytes]


def test_format_lines() -> None:
    kv = KVUsage(peak_bytes=1_474_560, kv_format="int8", pool_bytes=1 << 30)
    stats = TurnStats(0.0823, 18.07, 83, 64, 30, kv)
    assert stats.num_prefilled_tokens == 19
    line = format_generate_stats(stats)
    assert line == (
        "[kvlm] ttft 82 ms | decode 18.1 tok/s | prompt 83 tok | generated 30 tok | "
        "kv cache peak 1.41 MiB (int8, pool 1.00 GiB)"
    )
    assert format_chat_stats(2, stats) == (
        "[turn 2] prompt 83 tok | reused from cache 64 | prefilled 19 | generated 30 | "
        "ttft 82 ms | decode 18.1 tok/s"
    )
    no_cache = TurnStats(None, None, 5, 0, 1, None)
    assert "n/a" in format_generate_stats(no_cache) and "no cache" in format_chat_stats(1, no_cache)
    assert format_bytes(512) == "512 B" and format_bytes(2048) == "2.00 KiB"
