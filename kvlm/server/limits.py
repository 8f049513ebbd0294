"""What keeps one request from freezing the server: a cap on the body size, checked before the
body is read, and a bound on the prompt's length in characters, checked before tokenizing.

Tokenizing itself runs on a worker thread (`driver.py`); these two make sure no request can
make that thread, or JSON parsing, work on more than the context could ever use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvlm.sampling.structured_grammar import GrammarCompiler
from kvlm.server.errors import APIError
from kvlm.tokenizer import Tokenizer

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # 8 MiB: far above a full context of text


def _too_large(num_bytes: int, limit: int, exact: bool) -> APIError:
    size = f"{num_bytes:,} bytes" if exact else f"more than {limit:,} bytes"
    return APIError(
        f"request body is {size}; this server accepts at most {limit:,} "
        "(kvlm serve --max-request-bytes): shorten the prompt",
        status_code=413,
        code="request_too_large",
    )


class BodySizeLimitMiddleware:
    """413 for a body over `max_bytes`: at once when Content-Length says so (the body is never
    read), else as soon as the bytes received pass the limit (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = _too_large(int(declared), self.max_bytes, exact=True)
            await error.to_response()(scope, receive, send)
            return
        num_received = 0

        async def limited_receive() -> Message:
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_bytes:
                    raise _too_large(num_received, self.max_bytes, exact=False)
            return message

        await self.app(scope, limited_receive, send)


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token can stand for.

    The larger of each token's raw piece ("Ġworld", "▁world") and its decoded text, so a
    SentencePiece token whose leading space the decoder drops is not undercounted.
    """
    longest = 1
    for token_id in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_token(token_id)
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        longest = max(longest, len(piece.encode()), len(text.encode()))
    return longest


class PromptLengthLimit:
    """Refuses text too long to fit the context whatever its tokens, without tokenizing it.

    Text longer than `max_token_bytes * (max_model_len - 1)` characters (a character is at
    least one byte) needs at least `max_model_len` tokens, more than the engine takes. The
    bound walks the vocabulary once, on first use (on a worker thread, like tokenizing).
    """

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    @functools.cached_property
    def max_chars(self) -> int:
        return max_token_bytes(self.tokenizer) * (self.max_model_len - 1)

    def check(self, text: str, param: str) -> None:
        if len(text) > self.max_chars:
            raise APIError(
                f"{param} is {len(text):,} characters: it cannot fit the context of "
                f"{self.max_model_len:,} tokens (at most {self.max_chars:,} characters could); "
                "shorten it",
                param=param,
            )


@dataclass(frozen=True)
class ModelLimits:
    """What the served model allows, known once at startup."""

    name: str
    max_model_len: int
    vocab_size: int  # token ids in [0, vocab_size) are valid in logit_bias and prompts
    prompt_length: PromptLengthLimit  # refuses text that cannot fit, before tokenizing
    unbounded_length: bool = False  # attention sinks: generation may run past the context
    prefix_adapters: frozenset[str] = frozenset()  # served as `prefix_adapter` or 'name:adapter'
    # The engine's grammar compiler: a constraint is compiled (checked) before it is queued.
    grammars: GrammarCompiler | None = None
