"""`kvlm memory`: the JSON shape, the table, every model source, and one `error:` line for bad
values (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvlm.cli.main import main
from kvlm.loading import resolve_model_path

GiB = 1 << 30


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["memory", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(_run([*argv, "--json"], capsys))


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `kvlm memory ARGV`; assert exit 2 and one `error:` line; return that line."""
    try:
        code = main(["memory", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_json_for_a_gqa_preset(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(["llama-3-8b", "--context", "8192", "--batch", "2"], capsys)
    # 2 x 32 layers x 8 KV heads x 128 head_dim x 2 bytes (auto = published bfloat16)
    assert data["kv_cache_dtype"] == "bfloat16" and data["kv_cache_dtype_option"] == "auto"
    assert data["bytes_per_token"] == 2 * 32 * 8 * 128 * 2 == 131_072
    assert data["bytes_per_sequence"] == 131_072 * 8192 == GiB
    assert data["total_bytes"] == 2 * GiB
    (group,) = data["groups"]
    assert group == {
        "layer_ids": list(range(32)),
        "num_layers": 32,
        "window": None,
        "sinks": 0,
        "kv_format": "bfloat16",
        "bytes_per_token": 131_072,
        "page_nbytes": 16 * 131_072,
        "blocks_per_sequence": 512,
        "bytes_per_sequence": GiB,
        "total_bytes": 2 * GiB,
    }
    # naive: 2 x 32 layers x 8,192 tokens x d_model 4,096 x 2 B, for 2 sequences
    assert data["naive"]["total_bytes"] == 2 * (2 * 32 * 8192 * 4096 * 2)
    assert data["naive"]["element_bytes"] == 2
    assert data["ratio"] == 4.0
    assert data["factors"] == {"kv_heads": 0.25, "format": 1.0, "tokens_held": 1.0}


def test_json_for_the_embedded_gemma_with_int4(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(["gemma3-270m", "--context", "32768", "--kv-cache-dtype", "int4"], capsys)
    assert data["kind"] == "gguf"
    # int4 token-head: 256 / 2 bytes + 256 / 32 float16 scales = 144 B; 2 x 18 layers x 1 head
    assert data["bytes_per_token"] == 2 * 18 * 1 * 144 == 5184
    full, local = data["groups"]
    assert (full["layer_ids"], full["window"], full["blocks_per_sequence"]) == (
        [5, 11, 17],
        None,
        32768 // 16,
    )
    assert (local["num_layers"], local["window"], local["blocks_per_sequence"]) == (15, 512, 33)
    assert data["total_bytes"] == 16 * (2048 * 3 + 33 * 15) * 2 * 144
    assert data["naive"]["element_bytes"] == 2  # 16-bit for a quantized format


def test_auto_is_float32_for_files(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(["smollm2", "--context", "100"], capsys)
    assert data["kv_cache_dtype"] == "float32"
    # 2 x 30 layers x 3 KV heads x 64 head_dim x 4 bytes; 100 tokens in 7 blocks of 16
    assert data["bytes_per_token"] == 2 * 30 * 3 * 64 * 4 == 46_080
    assert data["total_bytes"] == 7 * 16 * 46_080


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(["gemma-3-27b", "--context", "131072", "--kv-cache-dtype", "int8"], capsys)
    assert "GQA 2:1" in out and "1,024" in out  # the local window
    assert "GiB" in out and "MiB" in out
    assert "naive multi-head: 2 x 62 layers x 131,072 tokens x d_model 5,376 x 2 B" in out
    assert "x less than naive" in out


def test_sinks_and_a_forced_window(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["llama-3-8b", "--context", "8000", "--sliding-window", "1024"]
    data = _json([*argv, "--attention-sinks", "4"], capsys)
    # 1,024 / 16 = 64 window blocks, +1 when it straddles a block, +1 for the 4 sinks
    assert [(g["window"], g["sinks"], g["blocks_per_sequence"]) for g in data["groups"]] == [
        (1024, 4, 66)
    ]
    # with sinks a context past the model's maximum is allowed (StreamingLLM)
    data = _json([*argv, "--attention-sinks", "4", "--context", "100000"], capsys)
    assert data["groups"][0]["blocks_per_sequence"] == 66


def test_prompt_chunks_cost_more_in_window_groups(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["gemma-3-270m", "--context", "8192"]
    decoded = _json(base, capsys)
    prompted = _json([*base, "--prompt-tokens", "8192", "--prefill-chunk", "2048"], capsys)
    # the last chunk: 2,048 new tokens plus the 511 before them that its first token sees
    assert prompted["groups"][1]["blocks_per_sequence"] == -(-(2048 + 511) // 16) == 160
    assert decoded["groups"][1]["blocks_per_sequence"] == 33
    assert prompted["peak_at"] == {"num_tokens": 8192, "num_new_tokens": 2048}


def test_hf_folder_needs_only_config_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
        "vocab_size": 49152,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = _json([str(tmp_path), "--context", "100", "--kv-cache-dtype", "bfloat16"], capsys)
    assert data["kind"] == "hf"
    assert data["bytes_per_token"] == 2 * 30 * 3 * 64 * 2


def test_gguf_header_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_weights(*args: object) -> None:
        raise AssertionError("kvlm memory read a tensor")

    monkeypatch.setattr("kvlm.loading.gguf_file.read_tensor_bytes", no_weights)
    monkeypatch.setattr("kvlm.loading.gguf_loader.read_tensor_bytes", no_weights)
    data = _json([str(resolve_model_path("smollm2")), "--context", "8192"], capsys)
    assert data["kind"] == "gguf" and data["max_model_len"] == 8192


def test_fp8_where_torch_has_it(capsys: pytest.CaptureFixture[str]) -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    data = _json(["llama-3-8b", "--context", "16", "--kv-cache-dtype", "fp8"], capsys)
    # 128 one-byte values + a float16 scale per 32 of them = 136 B per token-head
    assert data["bytes_per_token"] == 2 * 32 * 8 * (128 + 4 * 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-cache-dtype", "int3"], "kv_cache_dtype must be one of auto, float32"),
        (["--sliding-window", "0"], "sliding_window must be >= 1 token, got 0"),
        (["--attention-sinks", "4"], "attention_sinks (4) needs a sliding_window"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--block-size", "12"], "block_size must be a power of two"),
        (["--prompt-tokens", "200"], "prompt_tokens must be between 0 and the context (100)"),
    ],
)
def test_bad_values(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert message in _fails(["llama-3-8b", "--context", "100", *argv], capsys)


def test_context_over_a_preset_maximum(capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(["llama-3-70b", "--context", "131072"], capsys)
    assert "131,072" in line and "8,192" in line
    assert "llama-3.1-70b" in line  # the same KV layout with a longer context
    assert "context must be >= 1" in _fails(["llama-3-8b", "--context", "0"], capsys)


def test_context_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--context" in _fails(["llama-3-8b"], capsys)


def test_unknown_model_lists_presets_and_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(["llama-9-1t", "--context", "10"], capsys)
    assert "'llama-9-1t' not found" in line
    assert "gemma-3-27b" in line and "smollm2-135m" in line  # presets
    assert "gemma3-270m" in line and "smollm2" in line  # aliases


def test_truncated_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 100)
    assert "corrupt or truncated" in _fails([str(junk), "--context", "10"], capsys)


def test_fp8_without_float8(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch, "float8_e4m3fn", raising=False)
    line = _fails(["llama-3-8b", "--context", "10", "--kv-cache-dtype", "fp8"], capsys)
    assert "fp8 needs torch.float8_e4m3fn" in line and "int8" in line
