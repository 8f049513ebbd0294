"""Offline scoring on the exact path (what `/v1/completions` with echo and logprobs returns,
held to it in tests/server/test_server_echo_logprobs.py) against transformers on the same GGUF:
each token's log-probability within 1e-4 in float32, also after a shared prefix was cached."""

from __future__ import annotations

import torch
from scoring_texts import TEXTS

from kvlm import SamplingParams
from kvlm.engine.scoring import token_logprobs


def _hf_token_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[n - 1]: log p(token i | tokens before it) from one forward over the whole text."""
    with torch.inference_mode():
        logits = model(torch.tensor([token_ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]


def test_scoring_matches_transformers(smollm2_llm, hf_smollm2) -> None:
    hf_model, _ = hf_smollm2
    ids = [smollm2_llm.tokenizer.encode(text) for text in TEXTS]
    # the header's blocks are cached before either text is scored
    smollm2_llm.generate({"prompt_token_ids": ids[0]}, SamplingParams(max_tokens=1))
    for token_ids in ids:
        scored = token_logprobs(smollm2_llm.engine, token_ids)
        expected = _hf_token_logprobs(hf_model, token_ids)
        assert scored.dtype == torch.float32 and scored.shape == expected.shape
        assert torch.allclose(scored, expected, atol=1e-4, rtol=0), (scored - expected).abs().max()
