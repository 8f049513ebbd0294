"""Beam search on the exact path against transformers' `generate(num_beams=w, do_sample=False)`
on the same GGUF: the same w sequences in the same order, scores within 1e-4.

A short-answer chat makes SmolLM2 end hypotheses with its EOS token within the budget, so the
finished-hypothesis rules and each `early_stopping` mode are exercised; Gemma 3's prompt runs
to `max_tokens` through its sliding-window and global layer groups.
"""

from __future__ import annotations

import pytest
import torch
from test_transformers_oracle import CHATS, GEMMA_PROMPTS

from kvlm.sampling.beam import BeamSearchParams

NEW_TOKENS = 12
SHORT_ANSWER = "What is the capital of France? Answer with one word."
# (beam_width, length_penalty, early_stopping)
CASES = [(2, 1.0, False), (4, 1.0, True), (4, 0.5, "never")]


def _hf_beams(model, prompt_ids, width, length_penalty, early_stopping):
    """[(generated ids, score)] best first, as transformers returns them."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            num_beams=width,
            num_return_sequences=width,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            return_dict_in_generate=True,
            output_scores=True,
        )
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()  # generated tokens per hypothesis
    start = len(prompt_ids)
    return [
        (out.sequences[i, start : start + n].tolist(), out.sequences_scores[i].item())
        for i, n in enumerate(lengths)
    ]


def _assert_same_beams(llm, hf_model, prompt_ids, width, length_penalty, early_stopping):
    expected = _hf_beams(hf_model, prompt_ids, width, length_penalty, early_stopping)
    bytes_used = llm.engine.kv_cache_bytes_used()
    params = BeamSearchParams(
        beam_width=width,
        max_tokens=NEW_TOKENS,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    [out] = llm.beam_search({"prompt_token_ids": prompt_ids}, params)
    got = [(s.output_token_ids, s.score) for s in out.sequences]
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    for (_, score), (_, hf_score) in zip(got, expected, strict=True):
        assert abs(score - hf_score) < 1e-4, (got, expected)
    for s in out.sequences:
        assert s.tokens[: len(prompt_ids)] == prompt_ids
        assert abs(s.score - s.cum_logprob / len(s.output_token_ids) ** length_penalty) < 1e-5
    llm.engine.kv_cache.check_integrity()
    assert llm.engine.kv_cache_bytes_used() == bytes_used, "every beam's blocks are returned"
    return out


@pytest.mark.parametrize(("width", "length_penalty", "early_stopping"), CASES)
@pytest.mark.parametrize("question", [SHORT_ANSWER, CHATS[0]])
def test_smollm2_beams_match_transformers(
    smollm2_llm, hf_smollm2, question, width, length_penalty, early_stopping
):
    prompt_ids = smollm2_llm.tokenizer.encode_chat([{"role": "user", "content": question}])
    out = _assert_same_beams(
        smollm2_llm, hf_smollm2[0], prompt_ids, width, length_penalty, early_stopping
    )
    if question == SHORT_ANSWER:  # the EOS rules ran: some hypothesis ended with it
        assert any(s.finish_reason == "stop" for s in out.sequences)


@pytest.mark.parametrize(("width", "length_penalty", "early_stopping"), CASES[:2])
def test_gemma3_beams_match_transformers(
    gemma3_llm, hf_gemma3, width, length_penalty, early_stopping
):
    prompt_ids = gemma3_llm.tokenizer.encode(GEMMA_PROMPTS[0])
    _assert_same_beams(gemma3_llm, hf_gemma3[0], prompt_ids, width, length_penalty, early_stopping)
