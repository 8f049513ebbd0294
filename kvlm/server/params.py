"""Request body -> (prompt, SamplingParams), refusing what kvlm cannot honour with a 400.

Each refusal names the field, the value and the limit. Range checks `SamplingParams` already
makes (top_p, top_k, seed, stop, logprobs, ...) are passed on with its message; a prompt
longer than the context is refused by the engine (`InputError`), which names both numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from kvlm.sampling import SamplingParams, SamplingParamsError
from kvlm.sampling.params import MAX_LOGPROBS
from kvlm.server.errors import APIError
from kvlm.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from kvlm.tokenizer import Tokenizer, TokenizerError

MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
_PARAM_FIELDS = frozenset(f.name for f in fields(SamplingParams))
_FIRST_WORD = re.compile(r"^(\w+)")


@dataclass(frozen=True)
class Prompt:
    """What the engine gets: token ids (always), and the text when the client sent text."""

    text: str | None
    token_ids: list[int]


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            f"model {requested!r} does not exist: this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def completion_prompt(request: CompletionRequest, tokenizer: Tokenizer) -> Prompt:
    """`prompt` as text or token ids; a list holding one prompt is unwrapped."""
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("prompt is empty: give at least one character", param="prompt")
        return Prompt(prompt, tokenizer.encode(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(
            f"prompt holds {len(prompt)} prompts; only one prompt per request is supported: "
            "send one request per prompt",
            param="prompt",
        )
    if isinstance(prompt, list):
        if not prompt:
            raise APIError("prompt is empty: give at least one token id", param="prompt")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            bad = next(t for t in prompt if isinstance(t, bool) or not isinstance(t, int))
            raise APIError(
                f"prompt must be a string or a list of token ids (ints), got {bad!r} in the list",
                param="prompt",
            )
        return Prompt(None, list(prompt))  # the engine checks the ids against the vocabulary
    if prompt is None:
        raise APIError("prompt is required", param="prompt")
    raise APIError(
        f"prompt must be a string or a list of token ids, got {type(prompt).__name__}",
        param="prompt",
    )


def chat_prompt(request: ChatCompletionRequest, tokenizer: Tokenizer) -> Prompt:
    """The conversation rendered with the model's chat template, then tokenized."""
    if not request.messages:
        raise APIError("messages is empty: give at least one message", param="messages")
    messages = []
    for i, message in enumerate(request.messages):
        fields_ = message.model_dump(exclude_none=True)
        fields_["content"] = _text_content(message.content, f"messages.{i}.content")
        messages.append(fields_)
    try:
        text = tokenizer.apply_chat_template(messages, request.add_generation_prompt)
        token_ids = tokenizer.encode(text, add_special_tokens=False)
    except TokenizerError as e:
        raise APIError(str(e), param="messages") from e
    return Prompt(text, token_ids)


def _text_content(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(
                    f"{param}.{j}: only text parts are supported, got type {kind!r}", param=param
                )
            if not isinstance(part.get("text"), str):
                raise APIError(f"{param}.{j}.text must be a string", param=param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(
        f"{param} must be a string or a list of text parts, got {type(content).__name__}",
        param=param,
    )


def sampling_params(
    request: SamplingRequest,
    *,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
) -> SamplingParams:
    """Check what SamplingParams cannot know (OpenAI's ranges, the context) and build it."""
    _check_unsupported(request)
    if request.n != 1:
        raise APIError(
            f"n must be 1 (one completion per request), got {request.n}: "
            "send the request several times with different seeds instead",
            param="n",
        )
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise APIError(
            f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {temperature!r}",
            param="temperature",
        )
    if max_tokens is not None and max_tokens < 1:
        raise APIError(
            f"{max_tokens_param} must be at least 1, got {max_tokens}", param=max_tokens_param
        )
    room = max_model_len - num_prompt_tokens
    if max_tokens is not None and room > 0 and max_tokens > room:
        raise APIError(
            f"{max_tokens_param} is {max_tokens:,} but the prompt has {num_prompt_tokens:,} "
            f"tokens and the context is {max_model_len:,}: at most {room:,} tokens can be "
            f"generated; lower {max_tokens_param} or shorten the prompt",
            param=max_tokens_param,
        )
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        name = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
        raise APIError(f"{name} must be in [0, {MAX_LOGPROBS}], got {logprobs}", param=name)
    optional = {
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
    }
    try:
        return SamplingParams(
            temperature=temperature,
            seed=request.seed,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            max_tokens=max_tokens,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            **{k: v for k, v in optional.items() if v is not None},
        )
    except SamplingParamsError as e:
        word = _FIRST_WORD.match(str(e))
        param = word.group(1) if word and word.group(1) in _PARAM_FIELDS else None
        raise APIError(str(e), param=param) from e


def _check_unsupported(request: SamplingRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if value not in (None, 0):
            raise APIError(
                f"{name} is not supported (got {value!r}); use repetition_penalty instead",
                param=name,
            )
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise APIError(
                "echo=true is not supported: the response holds only the completion; "
                "prepend the prompt yourself",
                param="echo",
            )
        if request.suffix is not None:
            raise APIError("suffix is not supported", param="suffix")
        if request.best_of not in (None, 1):
            raise APIError(f"best_of must be 1, got {request.best_of}", param="best_of")
