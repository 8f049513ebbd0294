"""Quantized weights through the whole model: greedy tokens agree with the exact float path.

The measure is teacher-forced: the float model generates 64 greedy tokens, then the quantized
model reads that same text in one prefill and its argmax at every position is compared with
the float model's token. (Free-running agreement is not a stable measure: one near-tie flip —
the float margins of the flips seen are 0.03-0.2 nats — sends the two texts apart for good.)
"""

from __future__ import annotations

import pytest
import torch

from kvlm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NUM_TOKENS = 64


def _argmax_at_every_position(llm: LLM, token_ids: list[int]) -> list[int]:
    """The model's greedy choice after each prefix of token_ids, from one prefill."""
    model = llm.engine.model
    captured: list[torch.Tensor] = []
    hook = model.norm.register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1))
    finally:
        hook.remove()
    hidden = torch.cat(captured)[-len(token_ids) :]  # [T, H]
    with torch.inference_mode():
        return model.logits(hidden).argmax(-1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3-270m"])
def test_quantized_greedy_tokens_agree_with_float(model: str) -> None:
    exact = LLM(model, weight_format="float", enable_prefix_caching=False)
    greedy = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    texts = []
    for prompt in PROMPTS:
        prompt_ids = exact.tokenizer.encode(prompt)
        generated = exact.generate([{"prompt_token_ids": prompt_ids}], greedy)[0]
        texts.append((prompt_ids, list(generated.outputs[0].token_ids)))
    del exact
    quantized = LLM(model, weight_format="gguf", enable_prefix_caching=False)
    for prompt_ids, generated in texts:
        predicted = _argmax_at_every_position(quantized, prompt_ids + generated)
        # position i predicts token i + 1: compare the predictions of each generated token
        choices = predicted[len(prompt_ids) - 1 : -1]
        agree = sum(a == b for a, b in zip(choices, generated, strict=True)) / NUM_TOKENS
        assert agree >= 0.9, f"{model}: {agree:.0%} of {NUM_TOKENS} tokens agree"
