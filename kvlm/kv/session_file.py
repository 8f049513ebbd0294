"""The session file: a conversation's tokens and the K/V of its blocks, checked on every read.

Layout (integers little-endian):
    magic           8 bytes   b"KVLMSESS"
    format version  u32
    header length   u64
    header          JSON (utf-8): model fingerprint, tokenizer hash, per-group layout and KV
                    format, block size, token ids, cache salt, messages, which blocks the
                    payload holds, payload length and digest
    header digest   16 bytes  blake2b over everything above
    payload         per group, per stored block, the block's bytes (`block_codec`)

The header's own digest makes its token ids trustworthy; the payload's digest (in the header)
makes the K/V trustworthy. A file whose header fails is unusable (`SessionFileError`); one whose
header passes but whose K/V cannot be used here (damaged, cut short, or written by another
model, tokenizer, KV format or block size) is `SessionRefused`: its conversation can still be
recomputed from the header's tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvlm.kv.block_hash import BLOCK_NAMING_VERSION
from kvlm.kv.fingerprint import CacheIdentity, unrotated_sink_keys

MAGIC = b"KVLMSESS"
FORMAT_VERSION = 2  # 2: blocks named by kv/block_hash.py's injective key
# Format 1 named blocks by an encoding where salts and token ids could run into each other: its
# header is read (the conversation's tokens are kept and recomputed), its K/V never served.
_READABLE_VERSIONS = (1, 2)
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST_SIZE = 16
_MAX_HEADER = 1 << 30
# A 181 MiB buffer written to a new file in one call took 0.6 s here, in 1 MiB slices 0.12 s.
_WRITE_SLICE = 1 << 20


class SessionFileError(ValueError):
    """The file is not a readable session file: nothing in it can be trusted."""


class SessionRefused(ValueError):
    """The header is sound but its K/V cannot be used here; its tokens can be recomputed."""


@dataclass(frozen=True)
class SessionHeader:
    model_fingerprint: str
    tokenizer_hash: str
    block_size: int
    kv_formats: list[str]  # per layer group
    layouts: list[str]  # per layer group (`fingerprint.group_layout`)
    token_ids: list[int]
    cache_salt: str | None
    messages: list[dict[str, Any]] | None  # the chat conversation, when one was saved
    num_blocks: int  # leading blocks of `token_ids` whose K/V the payload holds
    stored: list[list[int]]  # per group, block indices in the payload, in payload order
    payload_nbytes: int
    payload_digest: str
    block_naming: int = BLOCK_NAMING_VERSION  # how the blocks' names were computed

    def check_compatible(self, identity: CacheIdentity) -> None:
        """SessionRefused, naming both values, unless this cache can read the payload."""
        if any(unrotated_sink_keys(layout) for layout in self.layouts):
            raise SessionRefused(
                "the session was saved by an older kvlm that stored the keys of attention-sink "
                "groups unrotated; this one stores them roped by text position, so its K/V "
                "cannot be used here (save the conversation again)"
            )
        checks = [
            ("block naming version", self.block_naming, BLOCK_NAMING_VERSION, _OLD_NAMES),
            ("model", self.model_fingerprint, identity.model_fingerprint, "load the same model"),
            ("tokenizer", self.tokenizer_hash, identity.tokenizer_hash, "load the same model"),
            ("block size", self.block_size, identity.block_size, "pass --block-size"),
            ("KV format", self.kv_formats, identity.kv_formats, "pass --kv-cache-dtype"),
            ("cache layout", self.layouts, identity.layouts, "use the same window and sinks"),
        ]
        for what, saved, here, fix in checks:
            if saved != here:
                raise SessionRefused(
                    f"the session was saved with {what} {_show(saved)}, this engine has "
                    f"{_show(here)}; its K/V cannot be used here ({fix} to restore it)"
                )


_OLD_NAMES = "names from an older kvlm could collide: save the conversation again"


def _show(value: object) -> str:
    return " | ".join(map(str, value)) if isinstance(value, list) else str(value)


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    for part in parts:
        h.update(part)
    return h.digest()


Buffer = bytes | bytearray | memoryview


def payload_digest(buffers: Sequence[Buffer]) -> str:
    """The digest of the buffers' bytes back to back (the payload, however it is split)."""
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    for buffer in buffers:
        h.update(buffer)
    return h.hexdigest()


def write_session(path: Path, header: SessionHeader, buffers: Sequence[Buffer]) -> None:
    """Write atomically (a temporary file renamed over `path`), so a crash leaves the old file.
    The payload is `buffers` back to back, written in slices of `_WRITE_SLICE` bytes."""
    head = json.dumps(asdict(header), separators=(",", ":")).encode()
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(head))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(preamble)
        f.write(head)
        f.write(_digest(preamble, head))
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            for start in range(0, len(view), _WRITE_SLICE):
                f.write(view[start : start + _WRITE_SLICE])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: Path) -> tuple[SessionHeader, int]:
    """The checked header and the payload's offset; SessionFileError if it cannot be trusted."""
    try:
        with path.open("rb") as f:
            preamble = f.read(_PREAMBLE.size)
            if len(preamble) < _PREAMBLE.size or preamble[:8] != MAGIC:
                raise SessionFileError(f"{path} is not a kvlm session file (no KVLMSESS magic)")
            _, version, head_len = _PREAMBLE.unpack(preamble)
            if version not in _READABLE_VERSIONS:
                raise SessionFileError(
                    f"{path} has session format {version}; this kvlm reads formats "
                    f"{', '.join(map(str, _READABLE_VERSIONS))}"
                )
            if head_len > _MAX_HEADER:
                raise SessionFileError(f"{path}: header length {head_len:,} is not plausible")
            head = f.read(head_len)
            digest = f.read(_DIGEST_SIZE)
    except OSError as e:
        raise SessionFileError(f"cannot read session file {path}: {e.strerror or e}") from e
    if len(head) < head_len or len(digest) < _DIGEST_SIZE:
        raise SessionFileError(f"{path} is cut short inside its header")
    if not hmac.compare_digest(digest, _digest(preamble, head)):
        raise SessionFileError(f"{path}: header checksum mismatch (the file is damaged)")
    try:
        fields = json.loads(head)
        if version == 1:
            fields["block_naming"] = 1
        header = SessionHeader(**fields)
    except (ValueError, TypeError) as e:  # digest passed: written by an incompatible kvlm
        raise SessionFileError(f"{path}: header does not describe a session: {e}") from e
    return header, _PREAMBLE.size + head_len + _DIGEST_SIZE


def read_payload(path: Path, header: SessionHeader, offset: int) -> bytearray:
    """The payload (writable, so its pages can be viewed without a copy), checked for length
    and digest; SessionRefused otherwise."""
    with path.open("rb") as f:
        found = os.fstat(f.fileno()).st_size - offset
        if found != header.payload_nbytes:
            state = "cut short" if found < header.payload_nbytes else "longer than written"
            raise SessionRefused(
                f"{path} is {state}: its K/V should be {header.payload_nbytes:,} bytes, "
                f"found {found:,}"
            )
        f.seek(offset)
        payload = bytearray(found)
        num_read = f.readinto(payload)
    if num_read != found:
        raise SessionRefused(f"{path} changed while it was read (got {num_read:,} bytes)")
    if payload_digest([payload]) != header.payload_digest:
        raise SessionRefused(f"{path}: K/V checksum mismatch (the payload is damaged)")
    return payload
