"""Names of full blocks: a digest of an encoding that no two different blocks can share.

A block's name chains its parent's, so equal names mean equal prefixes. What is hashed is
`encode_block_key(parent, token_ids, cache_salt, extra_keys)`, an encoding injective by
construction (`decode_block_key` reads it back): every field has a fixed width or a length in
front of it, so no salt can run into the token ids and no token id into the next. Two requests
whose salts and tokens differ only in where a digit sits (salt "1" + [2, 3] and no salt +
[12, 3]) get different names.

- `cache_salt` comes from the client (a tenant's key): blocks of different salts never match;
- `extra_keys` come from the engine (a prefix adapter's digest), a field apart from the salt,
  so no client salt can stand for them.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Sequence

# Bumped whenever the encoding changes: names under another version never meet these, and
# session files and offload blobs carry it so that old ones are refused, never served.
BLOCK_NAMING_VERSION = 2
DIGEST_SIZE = 16
_TAG = b"kvlm-block-key"
_U32 = struct.Struct("<I")
_TOKEN = "q"  # int64 token ids, little-endian on every platform kvlm runs on
assert array(_TOKEN).itemsize == 8


def _field(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def encode_block_key(
    parent: bytes | None,
    token_ids: Sequence[int],
    cache_salt: str | None = None,
    extra_keys: Sequence[str] = (),
) -> bytes:
    """The bytes a block's name is the digest of:
    tag, version u8, parent (u8 flag + 16 bytes), salt (u8 flag + u32 length + utf-8),
    token count u32 + int64 each, extra key count u32 + (u32 length + utf-8) each."""
    if parent is not None and len(parent) != DIGEST_SIZE:
        raise ValueError(f"a parent name has {DIGEST_SIZE} bytes, got {len(parent)}")
    parts = [_TAG, bytes([BLOCK_NAMING_VERSION])]
    parts.append(b"\0" if parent is None else b"\1" + parent)
    parts.append(b"\0" if cache_salt is None else b"\1" + _field(cache_salt.encode()))
    parts.append(_U32.pack(len(token_ids)) + array(_TOKEN, token_ids).tobytes())
    parts.append(_U32.pack(len(extra_keys)) + b"".join(_field(k.encode()) for k in extra_keys))
    return b"".join(parts)


def decode_block_key(key: bytes) -> tuple[bytes | None, list[int], str | None, list[str]]:
    """(parent, token_ids, cache_salt, extra_keys) back from `encode_block_key`'s bytes."""
    view = memoryview(key)
    if bytes(view[: len(_TAG)]) != _TAG or view[len(_TAG)] != BLOCK_NAMING_VERSION:
        raise ValueError("not a block key of this naming version")
    at = len(_TAG) + 1

    def flag() -> bool:
        nonlocal at
        at += 1
        return bool(view[at - 1])

    def u32() -> int:
        nonlocal at
        at += 4
        return _U32.unpack_from(view, at - 4)[0]

    def take(n: int) -> bytes:
        nonlocal at
        at += n
        return bytes(view[at - n : at])

    parent = take(DIGEST_SIZE) if flag() else None
    salt = take(u32()).decode() if flag() else None
    tokens = array(_TOKEN)
    tokens.frombytes(take(8 * u32()))
    extra = [take(u32()).decode() for _ in range(u32())]
    if at != len(key):
        raise ValueError(f"{len(key) - at} bytes after the last field")
    return parent, tokens.tolist(), salt, extra


def hash_block(
    parent: bytes | None,
    token_ids: Sequence[int],
    cache_salt: str | None = None,
    extra_keys: Sequence[str] = (),
) -> bytes:
    """A full block's name: the digest of its unambiguous key."""
    key = encode_block_key(parent, token_ids, cache_salt, extra_keys)
    return hashlib.blake2b(key, digest_size=DIGEST_SIZE).digest()


def extend_block_hashes(
    block_hashes: list[bytes],
    token_ids: Sequence[int],
    num_tokens: int,
    block_size: int,
    cache_salt: str | None = None,
    extra_keys: Sequence[str] = (),
) -> None:
    """Append the names of the full blocks among the first `num_tokens` not named yet."""
    for i in range(len(block_hashes), num_tokens // block_size):
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        parent = block_hashes[-1] if block_hashes else None
        block_hashes.append(hash_block(parent, chunk, cache_salt, extra_keys))
