"""Bad input gets a clear error naming the value and the limit, and breaks nothing."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from kvlm import LLM, InputError, SamplingParams
from kvlm.config import ModelConfigError
from kvlm.loading import ModelLoadError, ModelNotFoundError, load_model
from kvlm.sampling import SamplingParamsError


def _write_gguf(path: Path, arch: str, tensor_type: gguf.GGMLQuantizationType) -> Path:
    """A tiny header-valid GGUF with one tensor of the given type."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {
        "embedding_length": 256,
        "feed_forward_length": 512,
        "block_count": 1,
        "context_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 4,
        "vocab_size": 8,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    if tensor_type == gguf.GGMLQuantizationType.F32:
        data = np.zeros((1, 256), dtype=np.float32)
    else:  # quantized tensors are given as raw bytes: [rows, bytes per row]
        data = np.zeros((1, 256 // block_elems * block_bytes), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_alias_lists_the_aliases() -> None:
    with pytest.raises(ModelNotFoundError, match="aliases gemma3-270m, smollm2"):
        LLM("no-such-model")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"))


def test_truncated_gguf_is_reported(tmp_path: Path, smollm2_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    with smollm2_path.open("rb") as src, broken.open("wb") as dst:
        dst.write(src.read(1 << 20))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        LLM(str(broken))


def test_not_a_gguf_is_reported(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a model" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(junk))


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba", gguf.GGMLQuantizationType.F32)
    with pytest.raises(ModelConfigError, match="unsupported architecture 'mamba'; kvlm runs"):
        load_model(str(path))


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "q2k.gguf", "llama", gguf.GGMLQuantizationType.Q2_K)
    with pytest.raises(ModelLoadError, match="'token_embd.weight' has type Q2_K; kvlm dequant"):
        load_model(str(path))


def test_hf_folder_without_weights_is_reported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="needs config.json and \\*.safetensors"):
        load_model(str(tmp_path))


def test_kv_budget_too_small_for_one_sequence_is_refused() -> None:
    # 8,192 tokens x 46,080 bytes (30 layers x K, V x 3 heads x 64 x fp32)
    with pytest.raises(ValueError, match=r"one 8192-token sequence, which needs 377,487,360 bytes"):
        LLM("smollm2", kv_cache_memory="1MiB")


def test_prompt_errors_name_value_and_limit(smollm2_llm: LLM) -> None:
    params = SamplingParams(max_tokens=2)
    with pytest.raises(InputError, match="prompt is empty"):
        smollm2_llm.generate([""], params)
    with pytest.raises(InputError, match="prompt is empty"):
        smollm2_llm.generate([{"prompt_token_ids": []}], params)
    limit = smollm2_llm.engine.max_model_len
    with pytest.raises(
        InputError, match=f"prompt has {limit + 5:,} tokens; the context is {limit:,}"
    ):
        smollm2_llm.generate([{"prompt_token_ids": [5] * (limit + 5)}], params)
    with pytest.raises(InputError, match=r"token ids must be ints in \[0, 49152\); got \[49152\]"):
        smollm2_llm.generate([{"prompt_token_ids": [1, 49152]}], params)
    with pytest.raises(InputError, match="2 SamplingParams for 1 prompts"):
        smollm2_llm.generate(["hi"], [params, params])
    # the engine is unharmed: nothing queued, and a good request still works
    assert not smollm2_llm.engine.has_unfinished()
    assert smollm2_llm.generate(["hi"], params)[0].outputs[0].token_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"top_k": -5}, "top_k"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_invalid_sampling_values(kwargs: dict, message: str) -> None:
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**kwargs)


def test_a_file_without_a_chat_template_and_no_built_in_one_says_so(
    gemma3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 3's GGUF carries no template; with no built-in for its architecture either, chat
    is refused by name (as for any such file)."""
    from kvlm.tokenizer import Tokenizer, TokenizerError
    from kvlm.tokenizer import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "builtin_template", lambda architecture: None)
    with pytest.raises(TokenizerError, match="chat template"):
        Tokenizer.from_gguf(gemma3_path).encode_chat([{"role": "user", "content": "hi"}])
