"""Session files written under the old block names are refused by version, never served."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from kvlm.engine.session import read
from kvlm.kv.fingerprint import CacheIdentity
from kvlm.kv.session_file import (
    FORMAT_VERSION,
    SessionFileError,
    SessionHeader,
    SessionRefused,
    read_header,
    write_session,
)
from kvlm.kv.spec import KVCacheSpec

SPEC = KVCacheSpec((0, 1), num_kv_heads=2, head_dim=32, block_size=4, kv_format="float32")
IDENTITY = CacheIdentity("model", "tokenizer", (SPEC,))


def _header() -> SessionHeader:
    return SessionHeader(
        model_fingerprint=IDENTITY.model_fingerprint,
        tokenizer_hash=IDENTITY.tokenizer_hash,
        block_size=IDENTITY.block_size,
        kv_formats=IDENTITY.kv_formats,
        layouts=IDENTITY.layouts,
        token_ids=[12, 3, 4, 5, 6],
        cache_salt="tenant-1",
        messages=None,
        num_blocks=0,
        stored=[[]],
        payload_nbytes=0,
        payload_digest=hashlib.blake2b(digest_size=16).hexdigest(),
    )


def _write_format(path: Path, version: int, fields: dict) -> None:
    """A session file as a kvlm writing format `version` laid it out (same preamble and digest)."""
    head = json.dumps(fields, separators=(",", ":")).encode()
    preamble = struct.pack("<8sIQ", b"KVLMSESS", version, len(head))
    digest = hashlib.blake2b(preamble + head, digest_size=16).digest()
    path.write_bytes(preamble + head + digest)


def test_a_format_1_file_keeps_its_tokens_and_refuses_its_kv(tmp_path: Path) -> None:
    path = tmp_path / "old.kvsession"
    fields = asdict(_header())
    del fields["block_naming"]  # format 1 had no such field
    _write_format(path, 1, fields)
    header, _ = read_header(path)
    assert header.block_naming == 1 and header.token_ids == [12, 3, 4, 5, 6]
    with pytest.raises(SessionRefused, match="block naming version 1, this engine has 2"):
        header.check_compatible(IDENTITY)
    loaded = read(IDENTITY, path)
    assert loaded.prefix is None and "older kvlm could collide" in loaded.refused


def test_the_current_format_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "new.kvsession"
    write_session(path, _header(), [])
    header, _ = read_header(path)
    assert FORMAT_VERSION == 2 and header.block_naming == 2
    header.check_compatible(IDENTITY)
    assert read(IDENTITY, path).refused is None


def test_an_unknown_format_is_not_a_session(tmp_path: Path) -> None:
    path = tmp_path / "future.kvsession"
    _write_format(path, 9, asdict(_header()))
    with pytest.raises(SessionFileError, match="session format 9; this kvlm reads formats 1, 2"):
        read_header(path)


def test_a_sink_cache_saved_with_unrotated_keys_is_refused(tmp_path: Path) -> None:
    """Before, groups with sinks stored keys unrotated: such a file keeps its tokens, never
    its K/V, even where window and sinks match."""
    sinks = KVCacheSpec((0, 1), 2, 32, 4, "float32", window=8, num_sinks=4)
    identity = CacheIdentity("model", "tokenizer", (sinks,))
    (layout,) = identity.layouts
    assert layout.endswith("window=8 sinks=4 keys=text-roped")
    old_layout = layout.removesuffix(" keys=text-roped")  # as an older kvlm wrote it
    path = tmp_path / "old-sinks.kvsession"
    write_session(path, replace(_header(), layouts=[old_layout]), [])
    header, _ = read_header(path)
    with pytest.raises(SessionRefused, match="stored the keys of attention-sink groups unrotated"):
        header.check_compatible(identity)
    loaded = read(identity, path)
    assert loaded.prefix is None and "roped by text position" in loaded.refused
    write_session(path, replace(_header(), layouts=[layout]), [])
    header, _ = read_header(path)
    header.check_compatible(identity)  # the new layout reads back
