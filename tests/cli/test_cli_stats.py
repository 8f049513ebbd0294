"""The stats lines, and the KV usage they report against what the pool really held."""

from __future__ import annotations

from kvlm import LLM, SamplingParams
from kvlm.cli.stats import (
    KVUsage,
    TurnStats,
    format_bytes,
    format_chat_stats,
    format_generate_stats,
    kv_usage_at_last_step,
)


def test_kv_usage_matches_the_pool_between_steps(smollm2_llm: LLM) -> None:
    """The last-step figure is >= every reading taken between steps, and at most a block more.

    14 prompt tokens + 20 outputs cross block boundaries at 16 and 32 tokens with K/V.
    """
    engine = smollm2_llm.engine
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    readings = []
    for output in smollm2_llm.stream({"prompt_token_ids": list(range(100, 114))}, params):
        if not output.finished:
            readings.append(engine.kv_cache_bytes_used())
    assert engine.kv_cache_bytes_used() == 0  # freed once finished
    usage = kv_usage_at_last_step(engine, output.metrics)
    assert usage is not None
    block_bytes = engine.kv_pool.nbytes // engine.block_manager.num_blocks
    assert usage.num_blocks == 3  # ceil((14 + 19) / 16)
    assert usage.num_bytes == 3 * block_bytes
    assert usage.pool_bytes == engine.kv_pool.nbytes
    # Between steps the pool never held more; the third block was taken inside the last step
    # (for the 33rd token with K/V) and freed in that same step, so no reading can see it.
    assert sorted(set(readings)) == [block_bytes, 2 * block_bytes]
    assert usage.num_bytes == max(readings) + block_bytes


def test_format_lines() -> None:
    kv = KVUsage(num_blocks=2, block_size=16, num_bytes=1_474_560, pool_bytes=1 << 30)
    stats = TurnStats(0.0823, 18.07, 83, 64, 30, kv)
    assert stats.num_prefilled_tokens == 19
    line = format_generate_stats(stats)
    assert line == (
        "[kvlm] ttft 82 ms | decode 18.1 tok/s | prompt 83 tok | generated 30 tok | "
        "kv cache 1.41 MiB held at the last step (2 blocks × 16 tokens, pool 1.00 GiB)"
    )
    assert format_chat_stats(2, stats) == (
        "[turn 2] prompt 83 tok | reused from cache 64 | prefilled 19 | generated 30 | "
        "ttft 82 ms | decode 18.1 tok/s"
    )
    no_cache = TurnStats(None, None, 5, 0, 1, None)
    assert "n/a" in format_generate_stats(no_cache) and "no cache" in format_chat_stats(1, no_cache)
    assert format_bytes(512) == "512 B" and format_bytes(2048) == "2.00 KiB"
