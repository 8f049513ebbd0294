"""kvlm with a PEFT prefix-tuning adapter against PEFT + transformers on the same GGUF.

Adapters are saved by PEFT itself, freshly initialised (non-zero); one has 20 virtual tokens
(a full block and a partial one, copied into each request's block), one 16 (exactly one block),
one 12 made by PEFT's prefix MLP (`prefix_projection`), Gemma's 7 (a partial block only, in
both its layer groups). Each case also checks that the
adapter changes the reference's tokens, or the comparison would prove nothing.
"""

from __future__ import annotations

import pytest
from peft_adapters import greedy_forward, save_prefix_adapter

from kvlm import LLM, SamplingParams

pytest.importorskip("peft")

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
# name -> (virtual tokens, prefix_projection)
SMOLLM2_ADAPTERS = {"twenty": (20, False), "sixteen": (16, False), "projected": (12, True)}


def _assert_matches_peft(llm: LLM, peft_model, base_model, adapter: str, prompt: str) -> None:
    prompt_ids = llm.tokenizer.encode(prompt)
    expected = greedy_forward(peft_model, prompt_ids, NEW_TOKENS)
    base = greedy_forward(base_model, prompt_ids, NEW_TOKENS)
    assert expected != base, "the adapter does not change the reference's tokens"
    out = llm.generate([{"prompt_token_ids": prompt_ids}], GREEDY, prefix_adapter=adapter)[0]
    assert out.outputs[0].token_ids == expected
    assert out.prompt_token_ids == prompt_ids  # the virtual tokens are not the user's


@pytest.fixture(scope="module")
def smollm2_peft(hf_smollm2, tmp_path_factory):
    """name -> (PeftModel, folder) for each smollm2 adapter, and a kvlm engine with both."""
    root = tmp_path_factory.mktemp("smollm2_prefix")
    models = {
        name: save_prefix_adapter(hf_smollm2[0], root / name, size, i, prefix_projection=mlp)
        for i, (name, (size, mlp)) in enumerate(SMOLLM2_ADAPTERS.items())
    }
    folders = {name: root / name for name in models}
    llm = LLM(
        "smollm2",
        prefix_adapters=folders,
        kv_cache_memory="64MiB",
        max_model_len=1024,
        weight_format="float",
    )
    return models, llm


@pytest.mark.parametrize("adapter", list(SMOLLM2_ADAPTERS))
def test_smollm2_greedy_matches_peft(smollm2_peft, hf_smollm2, adapter):
    models, llm = smollm2_peft
    prompt = "The three primary colours are"
    _assert_matches_peft(llm, models[adapter], hf_smollm2[0], adapter, prompt)


def test_gemma3_greedy_matches_peft(hf_gemma3, tmp_path):
    peft_model = save_prefix_adapter(hf_gemma3[0], tmp_path / "ad", 7, seed=3)
    adapters = {"ad": tmp_path / "ad"}
    llm = LLM(
        "gemma3-270m",
        prefix_adapters=adapters,
        kv_cache_memory="64MiB",
        max_model_len=1024,
        weight_format="float",
    )
    prompt = "The history of the printing press begins"
    _assert_matches_peft(llm, peft_model, hf_gemma3[0], "ad", prompt)
