"""Save a conversation's K/V to a session file and restore it into the prefix cache.

Saving copies the blocks the cache holds for the conversation's tokens (`export`, on the engine
thread: one gather per layer group; the caller makes sure they are computed first) and writes
them (`write`, any thread: one buffer per group, straight to the file).
Restoring checks the file (`read`, any thread: `session_file` does the checks), then writes its
blocks into the pools and names them (`restore_blocks`, engine thread), so the conversation's
next turn is an ordinary prefix hit. A file whose
K/V cannot be used is refused with the reason, and the conversation is recomputed from its
tokens: a session never puts K/V in the cache that the model would not have computed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlm.engine.request import RequestOutput
from kvlm.kv.block_codec import decode_pages, encode_pages
from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.fingerprint import CacheIdentity
from kvlm.kv.session_file import (
    SessionHeader,
    SessionRefused,
    payload_digest,
    read_header,
    read_payload,
    write_session,
)
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.transfer import BlockTransfer, GroupPages, PrefixBlocks
from kvlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvlm.engine.engine import LLMEngine

logger = logging.getLogger(__name__)
Message = dict[str, Any]


class SessionError(ValueError):
    """A session cannot be saved or restored by this engine (e.g. it runs without a cache)."""


@dataclass(frozen=True)
class Session:
    """What `load_session` found: the conversation, and how much of it needs no recomputing."""

    token_ids: list[int]
    messages: list[Message] | None
    cache_salt: str | None
    num_restored_tokens: int  # leading tokens whose K/V are now in the prefix cache
    refused: str | None = None  # why the file's K/V were not used (its tokens are recomputed)


def session_tokens(
    tokenizer: Tokenizer, conversation_or_request: list[Message] | RequestOutput
) -> tuple[list[int], list[Message] | None]:
    """The token ids a session keeps: a chat conversation as the template writes it (no
    generation prompt: the next turn's prompt starts with exactly these), or a request's
    prompt and completion."""
    if isinstance(conversation_or_request, RequestOutput):
        out = conversation_or_request
        return [*out.prompt_token_ids, *out.outputs[0].token_ids], None
    if not isinstance(conversation_or_request, list) or not all(
        isinstance(m, dict) for m in conversation_or_request
    ):
        raise SessionError(
            "save_session takes a chat conversation (a list of {'role', 'content'} dicts) or a "
            f"RequestOutput, got {type(conversation_or_request).__name__}"
        )
    messages = list(conversation_or_request)
    return tokenizer.encode_chat(messages, add_generation_prompt=False), messages


def _hashes(engine: LLMEngine, token_ids: list[int], cache_salt: str | None) -> list[bytes]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, len(token_ids), engine.config.block_size, cache_salt)
    return hashes


def _transfer(engine: LLMEngine) -> BlockTransfer:
    if engine.transfer is None:
        raise SessionError(
            "sessions need the KV cache with prefix caching: do not pass --no-cache or "
            "enable_prefix_caching=False"
        )
    return engine.transfer


def num_cached_tokens(engine: LLMEngine, token_ids: list[int], cache_salt: str | None) -> int:
    """Leading tokens of `token_ids` (whole blocks) whose K/V the cache holds now."""
    hashes = _hashes(engine, token_ids, cache_salt)
    return _transfer(engine).num_cached_blocks(hashes) * engine.config.block_size


def export(engine: LLMEngine, token_ids: list[int], cache_salt: str | None) -> PrefixBlocks:
    """Engine thread: copies of the cached blocks of `token_ids` (queued device copies)."""
    return _transfer(engine).export_prefix(_hashes(engine, token_ids, cache_salt))


def write(
    identity: CacheIdentity,
    path: Path,
    prefix: PrefixBlocks,
    token_ids: list[int],
    messages: list[Message] | None,
    cache_salt: str | None,
) -> SessionHeader:
    """Any thread: write exported blocks and their tokens to `path`; returns the header."""
    stored = [group.indices for group in prefix.groups]
    buffers = [encode_pages(group.pages) for group in prefix.groups]  # one per group
    header = SessionHeader(
        model_fingerprint=identity.model_fingerprint,
        tokenizer_hash=identity.tokenizer_hash,
        block_size=identity.block_size,
        kv_formats=identity.kv_formats,
        layouts=identity.layouts,
        token_ids=list(token_ids),
        cache_salt=cache_salt,
        messages=messages,
        num_blocks=prefix.num_blocks,
        stored=stored,
        payload_nbytes=sum(len(b) for b in buffers),
        payload_digest=payload_digest(buffers),
    )
    write_session(path, header, buffers)
    return header


@dataclass(frozen=True)
class SessionRead:
    """A checked session file: its header, and its blocks unless they were refused."""

    header: SessionHeader
    prefix: PrefixBlocks | None
    refused: str | None


def read(identity: CacheIdentity, path: Path) -> SessionRead:
    """Any thread: read and check `path`. SessionFileError if the file cannot be trusted at
    all; a sound file whose K/V cannot be used here comes back with `refused` set."""
    header, offset = read_header(path)
    try:
        header.check_compatible(identity)
        payload = read_payload(path, header, offset)
        prefix = _decode(identity.specs, header, memoryview(payload))
    except SessionRefused as e:
        logger.warning(
            "session %s refused, its %d tokens will be recomputed: %s",
            path,
            len(header.token_ids),
            e,
        )
        return SessionRead(header, None, str(e))
    return SessionRead(header, prefix, None)


def restore_blocks(engine: LLMEngine, loaded: SessionRead) -> Session:
    """Engine thread: put a checked file's blocks in the prefix cache."""
    header = loaded.header
    num_restored = 0
    if loaded.prefix is not None:
        hashes = _hashes(engine, header.token_ids, header.cache_salt)[: header.num_blocks]
        num_restored = _transfer(engine).import_prefix(hashes, loaded.prefix)
    return Session(
        header.token_ids, header.messages, header.cache_salt, num_restored, loaded.refused
    )


def _decode(
    specs: Sequence[KVCacheSpec], header: SessionHeader, payload: memoryview
) -> PrefixBlocks:
    """The payload's pages, per group with their block indices (views of `payload`)."""
    if len(header.stored) != len(specs) or any(
        indices != sorted(set(indices)) or any(i >= header.num_blocks for i in indices)
        for indices in header.stored
    ):
        raise SessionRefused("the header's block list does not fit its own block count")
    expected = sum(len(ix) * s.page_nbytes for ix, s in zip(header.stored, specs, strict=True))
    if expected != len(payload):
        raise SessionRefused(
            f"the payload has {len(payload):,} bytes; its blocks need {expected:,}"
        )
    groups = []
    offset = 0
    for spec, indices in zip(specs, header.stored, strict=True):
        end = offset + len(indices) * spec.page_nbytes
        groups.append(GroupPages(indices, decode_pages(spec, payload[offset:end], len(indices))))
        offset = end
    return PrefixBlocks(header.num_blocks, groups)
