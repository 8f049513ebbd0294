"""Prefix-tuning adapters saved by PEFT itself, and the reference PEFT + transformers give.

The reference is a greedy loop of full forward passes through the `PeftModel` (with
transformers 5.x / peft 0.21, `PeftModel.generate()` was seen to drop the prefix and return
the base model's tokens, while its forward pass keeps it).
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_prefix_adapter(hf_model, folder: Path, num_virtual_tokens: int, seed: int):
    """Wrap `hf_model` in a fresh prefix-tuning PeftModel (PEFT initialises the prefix with
    seeded normal noise, so it changes the model's tokens), save it to `folder`, return it."""
    import peft

    torch.manual_seed(seed)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    model = peft.get_peft_model(hf_model, config).eval()
    model.save_pretrained(str(folder))
    return model


def greedy_forward(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens from full forward passes, nothing cached between steps."""
    sequence = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(num_tokens):
            ids = torch.tensor([sequence])
            mask = torch.ones_like(ids)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
            sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(prompt_ids) :]
