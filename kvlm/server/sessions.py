"""Session routes: save a conversation's K/V on the server, restore it into the prefix cache.

    POST /v1/sessions/{name}          {"messages": [...]} or {"prompt_token_ids": [...]}
                                      (+ optional "cache_salt") -> the file's facts
    POST /v1/sessions/{name}/restore  -> the conversation, and how much of it was restored

Files live in the server's `--session-dir` as `{name}.kvs`; a name is 1-64 letters, digits,
`_`, `-` or `.` (never a path), so clients cannot reach other files. Saving first computes
whatever of the conversation the cache lacks (a one-token request in the normal batch), then
copies its blocks on the engine thread and writes the file on a worker thread; restoring reads
and checks the file on a worker thread and only copies blocks on the engine thread. Both are
/v1 routes, so `--api-key` protects them.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from kvlm.engine import session
from kvlm.engine.async_engine import AsyncLLMEngine
from kvlm.engine.engine import InputError
from kvlm.kv.session_file import SessionFileError
from kvlm.sampling import SamplingParams
from kvlm.server.errors import APIError, validation_error
from kvlm.tokenizer import TokenizerError

SESSION_SUFFIX = ".kvs"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SaveSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    cache_salt: str | None = None


def install_session_routes(app: FastAPI, engine: AsyncLLMEngine, session_dir: Path | None) -> None:
    def path_of(name: str) -> Path:
        if session_dir is None:
            raise APIError(
                "sessions are off on this server: start it with --session-dir DIR",
                status_code=404,
                code="sessions_disabled",
            )
        if not _NAME.match(name):
            raise APIError(
                f"session name {name!r} must be 1-64 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit",
                param="name",
            )
        return session_dir / f"{name}{SESSION_SUFFIX}"

    async def on_engine(fn: Any) -> Any:
        return await asyncio.wrap_future(engine.call(fn))

    async def identity() -> Any:
        return await asyncio.to_thread(lambda: engine.engine.cache_identity)

    @app.post("/v1/sessions/{name}")
    async def save_session(name: str, request: Request) -> dict[str, Any]:
        path = path_of(name)
        body = _parse(await request.body())
        token_ids, messages = await asyncio.to_thread(_tokens, engine, body)
        salt = body.cache_salt
        cached = await on_engine(lambda e: session.num_cached_tokens(e, token_ids, salt))
        block_size = engine.engine.config.block_size
        if cached < len(token_ids) // block_size * block_size:
            prefill = SamplingParams(max_tokens=1, temperature=0)
            try:
                async for _ in engine.generate(None, token_ids, prefill, cache_salt=salt):
                    pass
            except InputError as e:
                raise APIError(str(e), param="messages") from e
        prefix = await on_engine(lambda e: session.export(e, token_ids, salt))
        cache_identity = await identity()
        header = await asyncio.to_thread(
            session.write, cache_identity, path, prefix, token_ids, messages, salt
        )
        return {
            "name": name,
            "num_tokens": len(token_ids),
            "num_saved_tokens": header.num_blocks * block_size,
            "bytes": path.stat().st_size,
        }

    @app.post("/v1/sessions/{name}/restore")
    async def restore_session(name: str) -> dict[str, Any]:
        path = path_of(name)
        if not path.is_file():
            raise APIError(f"no session named {name!r}", status_code=404, code="not_found")
        cache_identity = await identity()
        try:
            loaded = await asyncio.to_thread(session.read, cache_identity, path)
        except SessionFileError as e:
            raise APIError(str(e), code="bad_session_file") from e
        restored = await on_engine(lambda e: session.restore_blocks(e, loaded))
        return {
            "name": name,
            "messages": restored.messages,
            "prompt_token_ids": restored.token_ids,
            "num_tokens": len(restored.token_ids),
            "num_restored_tokens": restored.num_restored_tokens,
            "refused": restored.refused,
        }


def _parse(raw: bytes) -> SaveSessionRequest:
    try:
        body = SaveSessionRequest.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise validation_error(e.errors()) from e
    if (body.messages is None) == (body.prompt_token_ids is None):
        raise APIError("send exactly one of 'messages' and 'prompt_token_ids'", param="messages")
    return body


def _tokens(
    engine: AsyncLLMEngine, body: SaveSessionRequest
) -> tuple[list[int], list[dict[str, Any]] | None]:
    if body.prompt_token_ids is not None:
        vocab = engine.vocab_size
        bad = [t for t in body.prompt_token_ids if not 0 <= t < vocab]
        if not body.prompt_token_ids or bad:
            raise APIError(
                f"prompt_token_ids must be a non-empty list of ids in [0, {vocab}); got "
                f"{bad[:5] or 'none'}",
                param="prompt_token_ids",
            )
        return body.prompt_token_ids, None
    if not body.messages:
        raise APIError("messages is empty: send the conversation to save", param="messages")
    try:
        return session.session_tokens(engine.tokenizer, body.messages or [])
    except (TokenizerError, session.SessionError) as e:
        raise APIError(str(e), param="messages") from e
