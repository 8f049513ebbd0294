"""Request body -> (prompt, SamplingParams), refusing what kvlm cannot honour with a 400.

The order is cheap checks first (fields, model), then the prompt (`prompts.py`, tokenized),
then the sampling parameters.

Each refusal names the field, the value and the limit. Range checks `SamplingParams` already
makes (top_p, top_k, seed, stop, penalties, ...) are passed on with its message; a prompt
longer than the context is refused in `prompts.py` when its length in characters proves it,
else by the engine (`InputError`) once tokenized, which names both numbers. `kv_press` is
read by `press.py`.

Everything here runs on a worker thread (tokenizing a long prompt takes a while), never on
the event loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from kvlm.sampling import SamplingParams, SamplingParamsError, StructuredOutputsParams
from kvlm.sampling.params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from kvlm.server.errors import APIError
from kvlm.server.limits import ModelLimits
from kvlm.server.press import requested_press
from kvlm.server.prompts import Prompt, chat_prompt, completion_prompts
from kvlm.server.protocol import (
    MAX_SEQUENCES,
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    UNSUPPORTED_STREAM_OPTIONS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    check_unsupported,
    parse_body,
)
from kvlm.server.structured import compiled_constraint
from kvlm.server.tools import ToolPlan, plan_tools
from kvlm.tokenizer import Tokenizer

MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
_PARAM_FIELDS = frozenset(f.name for f in fields(SamplingParams))
_FIRST_WORD = re.compile(r"^(\w+)")
_TOKEN_ID = re.compile(r"^[0-9]{1,10}$")


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            f"model {requested!r} does not exist: this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def requested_adapter(body: SamplingRequest, limits: ModelLimits) -> str | None:
    """The prefix adapter a request asks for, as `prefix_adapter` or by the model name
    '<served name>:<adapter>'; 400 for another model, 404 for an adapter not loaded."""
    in_model = None
    if body.model is not None and body.model != limits.name:
        base, colon, in_model = body.model.rpartition(":")
        if not colon or base != limits.name:
            check_model(body.model, limits.name)
    adapter, param = (
        (in_model, "model")
        if body.prefix_adapter is None
        else (body.prefix_adapter, "prefix_adapter")
    )
    if in_model is not None and adapter != in_model:
        raise APIError(
            f"model {body.model!r} names adapter {in_model!r} but prefix_adapter is "
            f"{body.prefix_adapter!r}: give the adapter once",
            param="prefix_adapter",
        )
    if adapter is not None and adapter not in limits.prefix_adapters:
        known = ", ".join(repr(f"{limits.name}:{a}") for a in sorted(limits.prefix_adapters))
        raise APIError(
            f"prefix adapter {adapter!r} does not exist: this server serves "
            f"{known or 'no adapters'} (start it with --prefix-adapter NAME=PATH)",
            status_code=404,
            param=param,
            code="model_not_found",
        )
    return adapter


def unsigned_seed(seed: int | None) -> int | None:
    """OpenAI's seeds are signed 64-bit integers; a negative one is taken as its unsigned
    64-bit value (as torch's `manual_seed` does), so -1 and 2**64 - 1 are the same seed."""
    return seed + 2**64 if seed is not None and -(2**63) <= seed < 0 else seed


def logit_bias(request: SamplingRequest, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` as ids; 400 for a key that is no token id of this model
    or a bias outside [-100, 100]."""
    if request.logit_bias is None:
        return None
    bias: dict[int, float] = {}
    for key, value in request.logit_bias.items():
        if not _TOKEN_ID.match(key) or int(key) >= vocab_size:
            raise APIError(
                f"logit_bias: key {key!r} is not a token id of this model: keys are token ids "
                f'as strings, "0" to "{vocab_size - 1}"',
                param="logit_bias",
            )
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise APIError(
                f"logit_bias: the bias for token {key} must be in "
                f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value!r}",
                param="logit_bias",
            )
        bias[int(key)] = value
    return bias


def sampling_params(
    request: SamplingRequest,
    *,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: int | None,
    num_prompt_tokens: int,
    limits: ModelLimits,
    structured: StructuredOutputsParams | None = None,
    prompt_logprobs: int | None = None,
    best_of: int | None = None,
) -> SamplingParams:
    """Check what SamplingParams cannot know (OpenAI's ranges, the context) and build it;
    `structured` is the request's constraint, compiled already (`structured.py`);
    `prompt_logprobs` is in the range of `logprobs`, checked here."""
    if request.stream_options is not None:
        check_unsupported(request.stream_options, UNSUPPORTED_STREAM_OPTIONS, "stream_options.")
    n = 1 if request.n is None else request.n
    for name, value in (("n", n), ("best_of", best_of)):
        if value is not None and not 1 <= value <= MAX_SEQUENCES:
            raise APIError(f"{name} must be in [1, {MAX_SEQUENCES}], got {value}", param=name)
    if structured is not None and max(n, best_of or 1) > 1:
        name = "n" if n > 1 else "best_of"
        raise APIError(
            f"{name} must be 1 with structured outputs or tools (their grammar state cannot "
            f"be forked), got {max(n, best_of or 1)}",
            param=name,
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
    room = limits.max_model_len - num_prompt_tokens
    if max_tokens is not None and room > 0 and max_tokens > room and not limits.unbounded_length:
        raise APIError(
            f"{max_tokens_param} is {max_tokens:,} but the prompt has {num_prompt_tokens:,} "
            f"tokens and the context is {limits.max_model_len:,}: at most {room:,} tokens can "
            f"be generated; lower {max_tokens_param} or shorten the prompt",
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
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "min_tokens": request.min_tokens,
    }
    try:
        return SamplingParams(
            temperature=temperature,
            seed=unsigned_seed(request.seed),
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            max_tokens=max_tokens,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            n=n,
            best_of=best_of,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            logit_bias=logit_bias(request, limits.vocab_size),
            structured_outputs=structured,
            kv_press=requested_press(request.kv_press),
            **{k: v for k, v in optional.items() if v is not None},
        )
    except SamplingParamsError as e:
        word = _FIRST_WORD.match(str(e))
        param = word.group(1) if word and word.group(1) in _PARAM_FIELDS else None
        raise APIError(str(e), param=param) from e


@dataclass(frozen=True)
class Prepared:
    """A request checked and ready for the engine: its body, and per prompt (completions may
    send several, one choice each, in order; chat sends one) its prompt and sampling params."""

    body: SamplingRequest
    prompts: list[Prompt]
    params: list[SamplingParams]  # params[i] goes with prompts[i]
    prefix_adapter: str | None = None
    tools: ToolPlan | None = None  # chat: what tools and tool_choice asked for

    def __post_init__(self) -> None:
        assert self.prompts and len(self.prompts) == len(self.params)


def prepare_completion(raw: bytes, tokenizer: Tokenizer, limits: ModelLimits) -> Prepared:
    """Cheap checks first (fields, model), then the prompts (tokenized), then the constraint
    (compiled) and the params."""
    body = parse_body(raw, CompletionRequest)
    adapter = requested_adapter(body, limits)
    check_unsupported(body, UNSUPPORTED_COMPLETION)
    prompts = completion_prompts(body, tokenizer, limits)
    structured = _constraint(body, limits)
    params = [completion_params(body, prompt, limits, structured) for prompt in prompts]
    return Prepared(body, prompts, params, adapter)


def prepare_chat(raw: bytes, tokenizer: Tokenizer, limits: ModelLimits) -> Prepared:
    body = parse_body(raw, ChatCompletionRequest)
    adapter = requested_adapter(body, limits)
    check_unsupported(body, UNSUPPORTED_CHAT)
    tools = plan_tools(body)
    prompt = chat_prompt(body, tokenizer, limits, tools)
    structured = _constraint(body, limits, None if tools is None else tools.grammar())
    params = chat_params(body, prompt, limits, structured)
    return Prepared(body, [prompt], [params], adapter, tools)


def _constraint(
    body: SamplingRequest, limits: ModelLimits, tool_grammar: str | None = None
) -> StructuredOutputsParams | None:
    assert limits.grammars is not None, "build ModelLimits with the engine's grammar compiler"
    return compiled_constraint(body, limits.grammars, tool_grammar)


def completion_params(
    request: CompletionRequest,
    prompt: Prompt,
    limits: ModelLimits,
    structured: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """With `echo`, `logprobs` asks for the prompt's log-probabilities too (OpenAI's legacy
    scoring), and `max_tokens: 0` returns the prompt only: the engine then generates one token
    (SamplingParams needs max_tokens >= 1, and the last prompt row is computed anyway) that
    the formatter drops (`CompletionFormatter.prompt_only`)."""
    max_tokens = request.max_tokens
    if max_tokens == 0 and request.echo:
        max_tokens = 1
    elif max_tokens == 0:
        raise APIError(
            "max_tokens must be at least 1, got 0 (0 only with echo=true, to score the prompt)",
            param="max_tokens",
        )
    if request.stream and request.best_of is not None and request.best_of > 1:
        raise APIError(
            f"best_of ({request.best_of}) cannot be combined with stream: the best completions "
            "are known only when all have finished (OpenAI refuses it too); drop one",
            param="best_of",
        )
    return sampling_params(
        request,
        max_tokens=max_tokens,
        max_tokens_param="max_tokens",
        logprobs=request.logprobs,
        num_prompt_tokens=len(prompt.token_ids),
        limits=limits,
        structured=structured,
        prompt_logprobs=request.logprobs if request.echo else None,
        best_of=request.best_of,
    )


def chat_params(
    request: ChatCompletionRequest,
    prompt: Prompt,
    limits: ModelLimits,
    structured: StructuredOutputsParams | None = None,
) -> SamplingParams:
    if request.max_completion_tokens is not None:
        max_tokens, max_tokens_param = request.max_completion_tokens, "max_completion_tokens"
    else:  # unset: until the context is full, as vLLM does
        max_tokens, max_tokens_param = request.max_tokens, "max_tokens"
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
    return sampling_params(
        request,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        num_prompt_tokens=len(prompt.token_ids),
        limits=limits,
        structured=structured,
    )
