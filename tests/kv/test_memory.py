"""The KV memory calculator: presets against the formula by hand, windows, sinks, formats,
and the embedded models' predictions against what the engine's block tables actually held."""

from __future__ import annotations

from typing import Any

import pytest

from kvlm import LLM, SamplingParams
from kvlm.kv.memory import KVMemoryError, estimate, split_budget
from kvlm.kv.spec import layer_groups
from kvlm.loading import resolve_model_path
from kvlm.loading.gguf_file import read_gguf
from kvlm.loading.gguf_loader import config_from_metadata
from kvlm.presets import PRESETS, same_kv_layout

GiB = 1 << 30


def _preset(name: str):
    return PRESETS[name].config


def _gguf_config(alias: str):
    contents = read_gguf(resolve_model_path(alias), lambda key: not key.startswith("tokenizer."))
    return config_from_metadata(contents.metadata, {t.name: t for t in contents.tensors})


def test_llama_3_8b_gqa_by_hand() -> None:
    # 2 (K and V) x 32 layers x 8 KV heads x 128 head_dim x 2 bytes (bf16) = 131,072 B/token
    est = estimate(_preset("llama-3-8b"), num_tokens=8192, kv_format="bfloat16")
    assert est.bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    # 8,192 tokens = 512 full blocks: exactly 1 GiB, no rounding
    assert est.total_bytes == 131_072 * 8192 == 1 * GiB
    # naive multi-head: 2 x 32 layers x 8,192 tokens x d_model 4,096 x 2 B = 4 GiB; GQA 4:1
    assert est.naive_bytes == 2 * 32 * 8192 * 4096 * 2 == 4 * GiB
    assert est.ratio == 4.0


def test_llama_3_70b_at_128k_is_40_gib_per_sequence() -> None:
    # 2 x 80 layers x 8 KV heads x 128 head_dim x 2 bytes = 327,680 B/token
    for name in ("llama-3-70b", "llama-3.1-70b"):
        est = estimate(_preset(name), num_tokens=8192, kv_format="bfloat16")
        assert est.bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680
    # Llama 3.0 stops at 8,192 tokens; 3.1 has the same KV layout and 131,072.
    est = estimate(_preset("llama-3.1-70b"), num_tokens=131_072, kv_format="bfloat16", batch_size=2)
    assert est.bytes_per_sequence == 327_680 * 131_072 == 40 * GiB
    assert est.total_bytes == 2 * 40 * GiB
    # naive: 2 x 80 x 131,072 x d_model 8,192 x 2 B = 320 GiB a sequence; GQA 64:8 saves 8x
    assert est.naive_bytes == 2 * (2 * 80 * 131_072 * 8192 * 2) == 2 * 320 * GiB
    assert est.ratio == 8.0


def test_multi_head_llama_2_equals_the_naive_figure() -> None:
    est = estimate(_preset("llama-2-7b"), num_tokens=4096, kv_format="float16")
    # 2 x 32 layers x 32 KV heads x 128 = 2 x 32 x d_model 4,096: no saving without GQA
    assert est.bytes_per_token == 2 * 32 * 32 * 128 * 2 == 2 * 32 * 4096 * 2 == 524_288
    assert est.total_bytes == est.naive_bytes == 524_288 * 4096 == 2 * GiB
    assert est.ratio == 1.0


def test_smollm2_block_rounding() -> None:
    # 2 x 30 layers x 3 KV heads x 64 head_dim x 4 bytes (float32) = 46,080 B/token
    est = estimate(_preset("smollm2-135m"), num_tokens=100, kv_format="float32")
    assert est.bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46_080
    # 100 tokens occupy ceil(100 / 16) = 7 blocks of 16 tokens
    assert est.groups[0].num_blocks == 7
    assert est.total_bytes == 7 * 16 * 46_080


def test_gemma_3_27b_local_layers_stay_at_the_window() -> None:
    config = _preset("gemma-3-27b")
    # layers 5, 11, ..., 59 are global (every 6th of 62): 10 global, 52 local (window 1024)
    est = estimate(config, num_tokens=131_072, kv_format="bfloat16")
    full, local = est.groups
    assert (full.spec.window, full.spec.num_layers) == (None, 10)
    assert (local.spec.window, local.spec.num_layers) == (1024, 52)
    per_layer = 2 * 16 * 128 * 2  # K and V x 16 KV heads x 128 head_dim x 2 bytes = 8,192 B
    assert est.bytes_per_token == 62 * per_layer == 507_904
    # A window of 1,024 tokens spans 64 blocks, 65 when it straddles a block boundary (every
    # count not a multiple of 16). 131,072 is a multiple of 16, so the peak is at 131,071
    # tokens: 8,192 global blocks and 65 local ones.
    assert est.peak_num_tokens == 131_071
    assert (full.num_blocks, local.num_blocks) == (8192, 65)
    assert est.total_bytes == 16 * (8192 * 10 * per_layer + 65 * 52 * per_layer)
    # Far beyond the window the local group does not grow; the global one does.
    shorter = estimate(config, num_tokens=32_768, kv_format="bfloat16")
    assert shorter.groups[1].num_blocks == 65
    assert shorter.groups[0].num_blocks == 2048
    # Before the window fills, the local layers hold what the sequence has.
    short = estimate(config, num_tokens=100, kv_format="bfloat16")
    assert [g.num_blocks for g in short.groups] == [7, 7]


def test_gemma_3_270m_windows_and_mqa() -> None:
    # 18 layers, 1 KV head (MQA) x head_dim 256; layers 5, 11, 17 global, 15 local (512)
    est = estimate(_preset("gemma-3-270m"), num_tokens=32_768, kv_format="bfloat16")
    per_layer = 2 * 1 * 256 * 2  # 1,024 B per token and layer
    assert [g.spec.layer_ids for g in est.groups] == [
        (5, 11, 17),
        tuple(i for i in range(18) if i not in (5, 11, 17)),
    ]
    assert [g.num_blocks for g in est.groups] == [2048, 33]  # 512 / 16 = 32, +1 straddling
    assert est.total_bytes == 16 * (2048 * 3 + 33 * 15) * per_layer


def test_sinks_add_their_blocks_to_the_window() -> None:
    # llama-3-8b forced to a 1,024 window with 4 sinks: 65 window blocks + 1 sink block
    est = estimate(_preset("llama-3-8b"), 8000, "bfloat16", sliding_window=1024, num_sinks=4)
    assert [(g.spec.window, g.spec.num_sinks, g.num_blocks) for g in est.groups] == [(1024, 4, 66)]
    assert est.total_bytes == 66 * 16 * 131_072


def test_int4_is_at_least_3_5x_smaller_than_fp16() -> None:
    for name in ("llama-3-8b", "gemma-3-270m", "smollm2-135m"):
        fp16 = estimate(_preset(name), 4096, "float16")
        int4 = estimate(_preset(name), 4096, "int4")
        # int4: head_dim / 2 bytes + one float16 scale per 32 values (128: 64 + 4 x 2 = 72 B)
        assert int4.total_bytes * 3.5 <= fp16.total_bytes, name
    # int8: 128 bytes + a float16 scale per 32 values = 136 B; 2 x 32 x 8 x 136 B/token
    assert estimate(_preset("llama-3-8b"), 16, "int8").bytes_per_token == 2 * 32 * 8 * 136


def _every_step(prompt_tokens: int, chunk: int, num_tokens: int) -> list[tuple[int, int]]:
    """(tokens cached after the step, tokens computed in it) for every step of one request."""
    steps = [
        (min(start + chunk, prompt_tokens), min(chunk, prompt_tokens - start))
        for start in range(0, prompt_tokens, chunk)
    ]
    return steps + [(n, 1) for n in range(prompt_tokens + 1, num_tokens + 1)]


@pytest.mark.parametrize("kv_format", ["float32", "bfloat16", "int8", "int4", "fp8"])
@pytest.mark.parametrize(("window", "sinks"), [(None, 0), (24, 0), (40, 5)])
@pytest.mark.parametrize(("prompt_tokens", "chunk"), [(0, 2048), (1, 7), (37, 16), (90, 32)])
def test_peak_is_the_most_held_at_any_step(
    kv_format: str, window: int | None, sinks: int, prompt_tokens: int, chunk: int
) -> None:
    config = _preset("gemma-3-270m")
    for n in (1, 15, 16, 17, 47, 48, 100, 129):
        if n < prompt_tokens:
            continue
        est = estimate(
            config,
            n,
            kv_format,
            batch_size=3,
            sliding_window=window,
            num_sinks=sinks,
            prompt_tokens=prompt_tokens,
            prefill_chunk=chunk,
        )
        steps = [
            sum(g.spec.max_blocks_held(*step) * g.spec.page_nbytes for g in est.groups)
            for step in _every_step(prompt_tokens, chunk, n)
        ]
        assert est.bytes_per_sequence == max(steps)
        assert est.total_bytes == 3 * sum(g.nbytes for g in est.groups)
        factors = est.factors()
        product = est.naive_bytes * factors["kv_heads"] * factors["format"]
        assert product * factors["tokens_held"] == pytest.approx(est.total_bytes)


def test_bad_values() -> None:
    config = _preset("llama-3-8b")
    with pytest.raises(KVMemoryError, match="context must be >= 1"):
        estimate(config, 0, "bfloat16")
    with pytest.raises(KVMemoryError, match="batch must be >= 1"):
        estimate(config, 10, "bfloat16", batch_size=0)
    with pytest.raises(KVMemoryError, match="needs a sliding_window"):
        estimate(config, 10, "bfloat16", num_sinks=4)
    with pytest.raises(KVMemoryError, match="sliding_window must be >= 1"):
        estimate(config, 10, "bfloat16", sliding_window=0)
    with pytest.raises(KVMemoryError, match="prompt_tokens must be between 0 and the context"):
        estimate(config, 10, "bfloat16", prompt_tokens=11)


def test_presets_agree_with_the_embedded_files() -> None:
    """The transcribed smollm2-135m and gemma-3-270m shapes equal the GGUF headers kvlm runs."""
    assert same_kv_layout(_preset("smollm2-135m"), _gguf_config("smollm2"))
    assert same_kv_layout(_preset("gemma-3-270m"), _gguf_config("gemma3-270m"))
    for preset in PRESETS.values():
        c = preset.config
        assert c.num_heads % c.num_kv_heads == 0 and c.max_model_len >= 4096, preset.name


# --- the engine holds what the calculator predicts ----------------------------------------


def _kv_peak(llm: LLM, prompt_tokens: int, num_tokens: int) -> int:
    """Run one greedy request whose cache reaches `num_tokens` tokens; its kv_peak_bytes.

    The last sampled token is never fed back, so P prompt tokens and M generated ones leave
    P + M - 1 tokens of K/V.
    """
    params = SamplingParams(
        max_tokens=num_tokens - prompt_tokens + 1, temperature=0, ignore_eos=True
    )
    prompt = {"prompt_token_ids": [100 + i % 1000 for i in range(prompt_tokens)]}
    (out,) = llm.generate([prompt], params)
    assert len(out.outputs[0].token_ids) == params.max_tokens
    return out.metrics.kv_peak_bytes


@pytest.mark.parametrize(
    ("model", "kwargs", "kv_format", "prompt_tokens", "num_tokens"),
    [
        ("smollm2", {}, "float32", 5, 40),
        ("smollm2", {"kv_cache_dtype": "int8"}, "int8", 5, 48),
        ("smollm2", {"kv_cache_dtype": "int4", "sliding_window": 32}, "int4", 5, 60),
        ("smollm2", {"sliding_window": 24, "attention_sinks": 4}, "float32", 5, 61),
        # a prompt in 16-token chunks: the window group holds each chunk plus its window
        ("smollm2", {"sliding_window": 40, "max_num_batched_tokens": 16}, "float32", 90, 100),
        # Gemma 3's own 512-token local layers, past the window with a chunked prompt
        ("gemma3-270m", {"max_num_batched_tokens": 64}, "float32", 600, 610),
    ],
)
def test_engine_holds_what_the_calculator_predicts(
    model: str, kwargs: dict[str, Any], kv_format: str, prompt_tokens: int, num_tokens: int
) -> None:
    llm = LLM(model, enable_prefix_caching=False, **kwargs)
    est = estimate(
        _gguf_config(model),
        num_tokens,
        kv_format,
        block_size=llm.config.block_size,
        sliding_window=kwargs.get("sliding_window"),
        num_sinks=kwargs.get("attention_sinks", 0),
        prompt_tokens=prompt_tokens,
        prefill_chunk=llm.config.max_num_batched_tokens,
    )
    assert _kv_peak(llm, prompt_tokens, num_tokens) == est.bytes_per_sequence


def test_budget_is_split_by_what_one_sequence_holds_of_each_group() -> None:
    # gemma-3-270m in bf16: 3 global layers (49,152 B a block), 15 with a 512 window
    # (245,760 B). A 4,096-token sequence in 512-token chunks holds 256 global blocks and
    # (512 + 512) / 16 = 64 window blocks: 12,582,912 + 15,728,640 = 28,311,552 B.
    specs = layer_groups(_preset("gemma-3-270m"), 16, "bfloat16")
    split = split_budget(specs, 64 << 20, 4096, 512)
    assert split.blocks_per_sequence == (256, 64)
    assert split.bytes_per_sequence == 28_311_552
    assert split.num_sequences == pytest.approx(67_108_864 / 28_311_552)  # 2.37
    assert split.num_blocks == (607, 152)  # int(256 x 2.37) + 1, int(64 x 2.37) + 1 (null)
    usable = sum((n - 1) * s.page_nbytes for n, s in zip(split.num_blocks, specs, strict=True))
    assert usable <= 64 << 20


def test_budget_that_cannot_hold_one_sequence_is_refused_with_the_figures() -> None:
    specs = layer_groups(_preset("smollm2-135m"), 16, "float32")  # 737,280 B a block
    assert split_budget(specs, 11_796_480, 256, 2048).num_blocks == (17,)  # exactly one
    with pytest.raises(KVMemoryError, match="11,796,479 bytes cannot hold one 256-token"):
        split_budget(specs, 11_796_479, 256, 2048)
