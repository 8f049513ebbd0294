"""KV blocks as bytes, and back: what session files and offload tiers hold.

A block's bytes (its *page*, `spec.page_nbytes` long) are its storage rows exactly as the KV
store keeps them (the cache's KV format, quantized or not), then its float16 scale rows when
the format has scales:
    data:   [rows_per_block, num_kv_heads, row_elements]  storage dtype
    scales: [rows_per_block, num_kv_heads, num_scales]    float16 (quantized formats only)
with rows_per_block = num_layers * 2 (K, V) * block_size. Nothing is converted, so a block
restored from bytes is bit-identical to the one written. Many blocks travel as one
`[num_blocks, page_nbytes]` uint8 tensor (`KVStore.read_pages` / `write_pages`), their pages
back to back, so a run of blocks is one buffer, never a Python loop over blocks.

A *sealed* block (offload tiers) is prefixed by a format tag (magic and the block naming
version) and a digest over its key and bytes, so a blob that was damaged, cut short, stored
under another key, or written under an older naming is refused instead of read as K/V.
"""

from __future__ import annotations

import hashlib
import hmac

import torch

from kvlm.kv.block_hash import BLOCK_NAMING_VERSION
from kvlm.kv.spec import KVCacheSpec

DIGEST_SIZE = 16
_SEAL_MAGIC = b"KVB"
_SEAL_TAG = _SEAL_MAGIC + bytes([BLOCK_NAMING_VERSION])


class CorruptBlockError(ValueError):
    """Bytes that are not a valid block of the expected spec (size or digest mismatch)."""


def encode_pages(pages: torch.Tensor) -> memoryview:
    """The bytes of `pages` ([num_blocks, page_nbytes] uint8), pages back to back, in host
    memory (on CUDA this waits for the pages' copy)."""
    return memoryview(pages.to("cpu").contiguous().numpy()).cast("B")


def decode_pages(
    spec: KVCacheSpec, raw: bytes | bytearray | memoryview, num_blocks: int
) -> torch.Tensor:
    """`num_blocks` pages of `spec` from exactly that many pages' bytes: [num_blocks,
    page_nbytes] uint8 on the CPU (a view of `raw` when it is writable, else a copy)."""
    if len(raw) != num_blocks * spec.page_nbytes:
        raise CorruptBlockError(
            f"{num_blocks} block(s) of this cache have {num_blocks * spec.page_nbytes:,} bytes; "
            f"got {len(raw):,}"
        )
    if num_blocks == 0:
        return torch.empty((0, spec.page_nbytes), dtype=torch.uint8)
    if memoryview(raw).readonly:
        raw = bytearray(raw)
    return torch.frombuffer(raw, dtype=torch.uint8).view(num_blocks, spec.page_nbytes)


def _digest(key: bytes, body: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(key)
    h.update(body)
    return h.digest()


def seal(key: bytes, body: bytes) -> bytes:
    """`body` prefixed by the format tag and a digest over the key and the body."""
    return _SEAL_TAG + _digest(key, body) + body


def unseal(key: bytes, blob: bytes) -> memoryview:
    """The body of a sealed blob; CorruptBlockError unless it has this format's tag and its
    digest matches `key`."""
    view = memoryview(blob)
    tag = bytes(view[: len(_SEAL_TAG)])
    if tag != _SEAL_TAG:
        written = tag[len(_SEAL_MAGIC)] if tag[: len(_SEAL_MAGIC)] == _SEAL_MAGIC else 1
        raise CorruptBlockError(
            f"block {key.hex()}: written with block naming version {written}, this kvlm "
            f"reads version {BLOCK_NAMING_VERSION} (older names could collide); refused"
        )
    view = view[len(_SEAL_TAG) :]
    body = view[DIGEST_SIZE:]
    if len(view) < DIGEST_SIZE or not hmac.compare_digest(view[:DIGEST_SIZE], _digest(key, body)):
        raise CorruptBlockError(f"block {key.hex()}: digest mismatch (damaged or not this block)")
    return body
