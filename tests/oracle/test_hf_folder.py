"""Hugging Face folders: transformers saves the GGUF-loaded model; kvlm must run it identically."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import save_file

from kvlm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _save(hf_pair, folder: Path) -> Path:
    """Write the folder by hand: transformers refuses save_pretrained on GGUF-loaded models."""
    model, tokenizer = hf_pair
    folder.mkdir()
    model.config.save_pretrained(folder)  # config.json
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares memory with the embedding
    save_file(state, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)  # tokenizer.json + tokenizer_config.json
    return folder


@pytest.mark.parametrize(
    ("model_fixture", "hf_fixture", "prompt"),
    [
        ("smollm2_llm", "hf_smollm2", "The three primary colours are"),
        ("gemma3_llm", "hf_gemma3", "Water boils at a temperature of"),
    ],
)
def test_safetensors_folder_generates_like_the_gguf(
    request, tmp_path: Path, model_fixture: str, hf_fixture: str, prompt: str
) -> None:
    from_gguf: LLM = request.getfixturevalue(model_fixture)
    folder = _save(request.getfixturevalue(hf_fixture), tmp_path / "model")
    from_folder = LLM(
        str(folder), kv_cache_memory="256MiB", max_model_len=2048, weight_format="float"
    )
    # Fields a config.json states differently from a GGUF header, without changing the math.
    restated = ("max_model_len", "eos_token_ids", "query_pre_attn_scalar")
    gguf_config = from_gguf.engine.model_config
    folder_config = replace(
        from_folder.engine.model_config, **{k: getattr(gguf_config, k) for k in restated}
    )
    assert folder_config == gguf_config
    assert from_folder.engine.model_config.attn_scale == gguf_config.attn_scale
    expected = from_gguf.generate([prompt], GREEDY)[0]
    got = from_folder.generate([prompt], GREEDY)[0]
    assert got.prompt_token_ids == expected.prompt_token_ids
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
