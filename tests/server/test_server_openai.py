"""The official `openai` client against the server: shapes, streaming, and greedy outputs equal to
`LLM.generate` / `LLM.chat` in-process (same model, same prompt, temperature 0)."""

from __future__ import annotations

import openai
import pytest
from live_server import API_KEY, MODEL_NAME, LiveServer

from kvlm import LLM, SamplingParams

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def reference(smollm2_llm: LLM) -> dict[str, list[int] | str]:
    """What the offline API generates greedily for PROMPT and MESSAGES."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    completion = smollm2_llm.generate(PROMPT, params)[0].outputs[0]
    chat = smollm2_llm.chat(MESSAGES, params)[0].outputs[0]
    return {
        "text": completion.text,
        "token_ids": completion.token_ids,
        "chat_text": chat.text,
        "chat_token_ids": chat.token_ids,
    }


def test_llm_get_tokenizer_is_the_engines(smollm2_llm: LLM, server: LiveServer) -> None:
    tokenizer = smollm2_llm.get_tokenizer()
    assert tokenizer is smollm2_llm.engine.tokenizer
    assert tokenizer.encode(PROMPT) == server.engine.tokenizer.encode(PROMPT)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion_equals_llm_generate(client: openai.OpenAI, reference: dict) -> None:
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = response.choices[0]
    assert choice.text == reference["text"]
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == len(reference["token_ids"]) == MAX_TOKENS
    assert response.usage.total_tokens == response.usage.prompt_tokens + MAX_TOKENS


def test_completion_from_token_ids_equals_text_prompt(
    client: openai.OpenAI, reference: dict, smollm2_llm: LLM
) -> None:
    ids = smollm2_llm.tokenizer.encode(PROMPT)
    response = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].text == reference["text"]
    assert response.usage.prompt_tokens == len(ids)


def test_completion_stream_equals_llm_generate(client: openai.OpenAI, reference: dict) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == reference["text"]
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == MAX_TOKENS
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + MAX_TOKENS


def test_chat_equals_llm_chat(client: openai.OpenAI, reference: dict) -> None:
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference["chat_text"]
    assert response.usage.completion_tokens == len(reference["chat_token_ids"])


def test_chat_stream_equals_llm_chat(client: openai.OpenAI, reference: dict) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_completion_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks, usage_chunk = chunks[:-1], chunks[-1]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == reference["chat_text"]
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == len(reference["chat_token_ids"])


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_completion(client: openai.OpenAI, reference: dict) -> None:
    stop = reference["text"].strip().split()[1]  # a word the greedy text contains
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert reference["text"].startswith(choice.text)


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    """The same seed gives the same text; other seeds other texts, none of them greedy's (so
    an engine that ignored temperature, or the seed, would fail)."""

    def sample(seed: int | None, temperature: float = 1.0) -> str:
        response = client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=16,
            temperature=temperature,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return response.choices[0].text

    seeds = [1234, 1235, 99]
    texts = [sample(seed) for seed in seeds]
    assert [sample(seed) for seed in seeds] == texts
    assert len(set(texts)) == len(seeds), texts
    assert sample(None, temperature=0) not in texts


def test_completion_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == response.choices[0].text
    rows = zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True)
    for token, lp, top in rows:
        assert lp <= 0
        assert top[token] == lp  # greedy: the chosen token is the likeliest
        assert len(top) == 2


def test_chat_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob == entry.logprob


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert "gpt-4" in info.value.message and MODEL_NAME in info.value.message


def test_openai_client_wrong_key_is_unauthorized(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
