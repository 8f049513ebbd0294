"""A generation request's prompt, named by the block hashes its engine will give it, so the
router can find the replica that holds the prefix (`affinity.PrefixAffinity`).

The prompt is read by the server's own steps (`parse_body`, `requested_adapter`, the tool
plan, `completion_prompt` / `chat_prompt`): the token ids are the ones the replica computes.
The sampling half of `params.prepare_*` (constraints compiled, params checked) is left to
the replica: it changes no token of the prompt.
"""

from __future__ import annotations

from kvlm.kv.block_hash import extend_block_hashes
from kvlm.server.errors import APIError
from kvlm.server.limits import ModelLimits
from kvlm.server.params import requested_adapter
from kvlm.server.prompts import chat_prompt, completion_prompt
from kvlm.server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from kvlm.server.tools import plan_tools
from kvlm.tokenizer import Tokenizer

PROMPT_ROUTES = ("/v1/completions", "/v1/chat/completions")


def prompt_block_hashes(
    path: str, raw: bytes, tokenizer: Tokenizer, limits: ModelLimits, block_size: int
) -> tuple[bytes, ...]:
    """The names of the prompt's full blocks (salt and prefix adapter included, as the engine
    keys them); () for a body the replica will refuse: it answers with its own error."""
    assert path in PROMPT_ROUTES, path
    try:
        if path == "/v1/completions":
            body = parse_body(raw, CompletionRequest)
            adapter = requested_adapter(body, limits)
            token_ids = completion_prompt(body, tokenizer, limits).token_ids
        else:
            chat = parse_body(raw, ChatCompletionRequest)
            adapter = requested_adapter(chat, limits)
            token_ids = chat_prompt(chat, tokenizer, limits, plan_tools(chat)).token_ids
            body = chat
    except APIError:
        return ()
    hashes: list[bytes] = []
    extra_keys = (adapter,) if adapter else ()
    extend_block_hashes(hashes, token_ids, len(token_ids), block_size, body.cache_salt, extra_keys)
    return tuple(hashes)
