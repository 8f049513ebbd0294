"""The oracle: Hugging Face transformers loading the very same GGUF files, once per session.

transformers is a test dependency (`.[test]`), imported plainly: a missing or broken install
fails the oracle suite instead of skipping it.
"""

from __future__ import annotations

import pytest
import torch
import transformers


def _load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    return _load(smollm2_path)


@pytest.fixture(scope="session")
def hf_gemma3(gemma3_path):
    return _load(gemma3_path)
