"""`LLM`: the offline API, shaped like vLLM's (`generate`, `chat`, `SamplingParams`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kvlm.engine import session
from kvlm.engine.beam_search import BeamSearchOutput, beam_search
from kvlm.engine.config import EngineConfig
from kvlm.engine.continuations import ContinuationScore, score_continuations
from kvlm.engine.engine import InputError, LLMEngine
from kvlm.engine.request import RequestOutput
from kvlm.engine.session import Session
from kvlm.engine.task_prefixes import RegisteredPrefix, TaskPrefixes
from kvlm.sampling import SamplingParams
from kvlm.sampling.beam import BeamSearchParams
from kvlm.tokenizer import Tokenizer

PromptType = str | dict[str, Any]  # text, or {"prompt_token_ids": [...]} / {"prompt": "..."}
AdapterChoice = str | None | Sequence[str | None]  # one prefix adapter for all, or one each
Message = dict[str, str]


class LLM:
    """Load a model once, then generate for batches of prompts.

    >>> llm = LLM("smollm2")
    >>> params = SamplingParams(max_tokens=8, temperature=0)
    >>> out = llm.generate(["The capital of France is"], params)
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str = "smollm2", **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.config = self.engine.config  # with weight_format "auto" resolved
        self.tokenizer = self.engine.tokenizer
        self.task_prefixes = TaskPrefixes(self.engine.kv_cache)

    def get_tokenizer(self) -> Tokenizer:
        """The tokenizer the engine encodes prompts and decodes outputs with (as vLLM's)."""
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | None = None,
        prefix_adapter: AdapterChoice = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion as one continuously batched workload; each result
        holds the whole completion (text, token ids, logprobs) and its final metrics.

        `prefix_adapter` names a prefix-tuning adapter loaded with `prefix_adapters=` (or
        gives one name or None per prompt, mixing adapters in one batch)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = _per_prompt(sampling_params, len(prompts))
        adapters = _adapter_per_prompt(prefix_adapter, len(prompts))
        ids = [
            self._add(p, sp, cache_salt, a)
            for p, sp, a in zip(prompts, params, adapters, strict=True)
        ]
        return self._run(ids)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        prefix_adapter: AdapterChoice = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or several) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {
                "prompt_token_ids": self.tokenizer.encode_chat(conv, add_generation_prompt),
                "prompt": self.tokenizer.apply_chat_template(conv, add_generation_prompt),
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, prefix_adapter=prefix_adapter)

    def beam_search(
        self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams
    ) -> list[BeamSearchOutput]:
        """Beam search each prompt (vLLM's `LLM.beam_search`), scored and stopped as
        transformers' `generate(num_beams=params.beam_width, do_sample=False)` does: the
        beams are forks sharing the prompt's and their ancestors' KV blocks. Per prompt,
        `beam_width` sequences, best score first."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return beam_search(self.engine, [self._token_ids(p) for p in prompts], params)

    def score_continuations(
        self,
        prompts: PromptType | Sequence[PromptType],
        continuations: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[ContinuationScore]:
        """Per prompt, the log-probabilities of its continuation's tokens (text, or token ids)
        and their sum, computed after the prompt's KV cache was compressed by
        `sampling_params.kv_press` (only that field is read): answer log-likelihoods and the
        perplexity of text after a context (engine/continuations.py). Without a press, the
        same as scoring the concatenation."""
        if isinstance(prompts, (str, dict)):
            prompts, continuations = [prompts], [continuations]  # type: ignore[list-item]
        params = _per_prompt(sampling_params, len(prompts))
        tokens = [
            self.tokenizer.encode(c) if isinstance(c, str) else list(c)  # type: ignore[arg-type]
            for c in continuations
        ]
        return score_continuations(
            self.engine, [self._token_ids(p) for p in prompts], tokens, params
        )

    def stream(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        prefix_adapter: str | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield an output each step the request produces a token; the last one is finished.

        Outputs are deltas (vLLM's DELTA kind): `outputs[0].text`, `.token_ids` and
        `.logprobs` hold only what is new since the previous output, so joining the texts
        gives the completion (`OutputAccumulator` assembles the whole). Text that may still
        turn into a stop string is held back until it cannot; `metrics` is a snapshot.
        """
        request_id = self._add(prompt, sampling_params or SamplingParams(), None, prefix_adapter)
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def save_session(
        self,
        conversation_or_request: list[Message] | RequestOutput,
        path: str | Path,
        cache_salt: str | None = None,
    ) -> int:
        """Write a conversation's K/V (a chat's messages, or a finished request's prompt and
        completion) to `path`, computing first whatever of it the cache lacks; returns the
        number of tokens whose K/V the file holds. `load_session` restores it."""
        token_ids, messages = session.session_tokens(self.tokenizer, conversation_or_request)
        whole_blocks = len(token_ids) // self.config.block_size * self.config.block_size
        if session.num_cached_tokens(self.engine, token_ids, cache_salt) < whole_blocks:
            prefill = SamplingParams(max_tokens=1, temperature=0)
            self.generate({"prompt_token_ids": token_ids}, prefill, cache_salt)
        prefix = session.export(self.engine, token_ids, cache_salt)
        identity = self.engine.cache_identity
        header = session.write(identity, Path(path), prefix, token_ids, messages, cache_salt)
        return header.num_blocks * self.config.block_size

    def load_session(self, path: str | Path) -> Session:
        """Put a saved session's K/V in the prefix cache, so the conversation's next request
        is a prefix hit. A file that does not fit this engine (other model, tokenizer, KV
        format, block size) or whose K/V are damaged is refused: `Session.refused` says why
        and the conversation is recomputed. Raises SessionFileError when the file cannot be
        read as a session at all."""
        loaded = session.read(self.engine.cache_identity, Path(path))
        return session.restore_blocks(self.engine, loaded)

    def register_prefix(self, name: str, text: str) -> RegisteredPrefix:
        """Compute `text` once (a document, a system prompt) and pin its full blocks, so every
        later request whose prompt starts with its tokens reuses them however full the pool
        gets. Build such prompts from `RegisteredPrefix.token_ids` plus the task's own ids
        to be sure the tokens match (text joined before tokenizing may merge at the seam)."""
        token_ids = self.tokenizer.encode(text)
        self.task_prefixes.check_new(name, token_ids)
        self.generate({"prompt_token_ids": token_ids}, SamplingParams(max_tokens=1, temperature=0))
        return self.task_prefixes.pin(name, token_ids)

    def unregister_prefix(self, name: str) -> None:
        """Unpin a registered prefix; its blocks stay cached until the pool needs them."""
        self.task_prefixes.unpin(name)

    def _add(
        self,
        prompt: PromptType,
        params: SamplingParams,
        cache_salt: str | None,
        prefix_adapter: str | None = None,
    ) -> str:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt and "prompt" not in prompt:
                raise InputError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            return self.engine.add_request(
                prompt.get("prompt"),
                prompt.get("prompt_token_ids"),
                params,
                cache_salt,
                prefix_adapter=prefix_adapter,
            )
        return self.engine.add_request(
            prompt, None, params, cache_salt, prefix_adapter=prefix_adapter
        )

    def _token_ids(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise InputError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        return self.engine.run_to_completion(request_ids)


def _per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise InputError(f"got {len(params)} SamplingParams for {count} prompts")
    return list(params)


def _adapter_per_prompt(adapter: AdapterChoice, count: int) -> list[str | None]:
    if adapter is None or isinstance(adapter, str):
        return [adapter] * count
    if len(adapter) != count:
        raise InputError(f"got {len(adapter)} prefix adapters for {count} prompts")
    return list(adapter)
