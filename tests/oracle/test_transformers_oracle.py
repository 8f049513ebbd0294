"""kvlm against transformers on the same GGUF: greedy token ids and first-token log-probs."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

from kvlm import SamplingParams

NEW_TOKENS = 40
CHATS = [
    "Write a short story about a robot who learns to paint.",
    "Explain in detail how a refrigerator keeps food cold.",
    "List five tips for learning a new language, with a sentence on each.",
]
GEMMA_PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    ",
]


def _hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def _hf_first_logprobs(model, prompt_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def _long_text(min_tokens: int, tokenizer) -> str:
    """English prose from CPython's own docs, long enough to pass the sliding window."""
    text = ""
    for key in sorted(pydoc_data.topics.topics):
        text += pydoc_data.topics.topics[key]
        if len(tokenizer.encode(text)) > min_tokens:
            return text
    raise AssertionError("pydoc topics ran out of text")


def _assert_same_greedy(llm, hf_model, prompt_ids: list[int]) -> None:
    expected = _hf_greedy(hf_model, prompt_ids, NEW_TOKENS)
    assert len(expected) >= 32, f"oracle stopped after {len(expected)} tokens; pick a longer prompt"
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=5)
    out = llm.generate([{"prompt_token_ids": prompt_ids}], params)[0].outputs[0]
    assert out.token_ids == expected


def _assert_top5_logprobs(llm, hf_model, prompt_ids: list[int]) -> None:
    expected = _hf_first_logprobs(hf_model, prompt_ids)
    top = torch.topk(expected, 5)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    first = llm.generate([{"prompt_token_ids": prompt_ids}], params)[0].outputs[0].logprobs[0]
    for token_id, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        assert token_id in first, f"token {token_id} missing from kvlm's top-5"
        assert abs(first[token_id].logprob - value) < 1e-2


@pytest.mark.parametrize("question", CHATS)
def test_smollm2_chat_greedy_matches_transformers(smollm2_llm, hf_smollm2, question):
    hf_model, hf_tok = hf_smollm2
    messages = [{"role": "user", "content": question}]
    prompt_ids = smollm2_llm.tokenizer.encode_chat(messages)
    expected_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected_ids, list):  # transformers 5 returns a BatchEncoding
        expected_ids = expected_ids["input_ids"]
    assert prompt_ids == expected_ids
    _assert_same_greedy(smollm2_llm, hf_model, prompt_ids)
    _assert_top5_logprobs(smollm2_llm, hf_model, prompt_ids)


@pytest.mark.parametrize("prompt", GEMMA_PROMPTS)
def test_gemma3_greedy_matches_transformers(gemma3_llm, hf_gemma3, prompt):
    hf_model, hf_tok = hf_gemma3
    prompt_ids = gemma3_llm.tokenizer.encode(prompt)
    assert prompt_ids == hf_tok(prompt)["input_ids"]
    _assert_same_greedy(gemma3_llm, hf_model, prompt_ids)
    _assert_top5_logprobs(gemma3_llm, hf_model, prompt_ids)


def test_gemma3_past_sliding_window_matches_transformers(gemma3_llm, hf_gemma3):
    hf_model, hf_tok = hf_gemma3
    text = _long_text(700, gemma3_llm.tokenizer)
    prompt_ids = gemma3_llm.tokenizer.encode(text)[:700]
    window = gemma3_llm.engine.model_config.sliding_windows[0]
    assert window == 512 and len(prompt_ids) > window
    _assert_same_greedy(gemma3_llm, hf_model, prompt_ids)
    _assert_top5_logprobs(gemma3_llm, hf_model, prompt_ids)
