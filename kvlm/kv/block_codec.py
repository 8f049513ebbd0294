"""One KV block as bytes, and back: what session files and offload tiers hold.

A block's bytes are its storage rows exactly as the KV store keeps them (the cache's KV format,
quantized or not), then its float16 scale rows when the format has scales:
    data:   [rows_per_block, num_kv_heads, row_elements]  storage dtype
    scales: [rows_per_block, num_kv_heads, num_scales]    float16 (quantized formats only)
with rows_per_block = num_layers * 2 (K, V) * block_size. Nothing is converted, so a block
restored from bytes is bit-identical to the one written.

A *sealed* block (offload tiers) is prefixed by a format tag (magic and the block naming
version) and a digest over its key and bytes, so a blob that was damaged, cut short, stored
under another key, or written under an older naming is refused instead of read as K/V.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import torch

from kvlm.kv.block_hash import BLOCK_NAMING_VERSION
from kvlm.kv.spec import KVCacheSpec

DIGEST_SIZE = 16
_SEAL_MAGIC = b"KVB"
_SEAL_TAG = _SEAL_MAGIC + bytes([BLOCK_NAMING_VERSION])


class CorruptBlockError(ValueError):
    """Bytes that are not a valid block of the expected spec (size or digest mismatch)."""


@dataclass(frozen=True)
class BlockData:
    data: torch.Tensor  # [rows_per_block, num_kv_heads, row_elements] in the storage dtype
    scales: torch.Tensor | None  # [rows_per_block, num_kv_heads, num_scales] float16, or None


def rows_per_block(spec: KVCacheSpec) -> int:
    return spec.num_layers * 2 * spec.block_size


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def encode_block(block: BlockData) -> bytes:
    """The block's bytes (copied to the host; on CUDA this waits for the block's copy)."""
    raw = _raw(block.data)
    return raw if block.scales is None else raw + _raw(block.scales)


def decode_block(spec: KVCacheSpec, raw: bytes | memoryview) -> BlockData:
    """A CPU block of `spec` from exactly `spec.page_nbytes` bytes."""
    if len(raw) != spec.page_nbytes:
        raise CorruptBlockError(
            f"a block of this cache has {spec.page_nbytes:,} bytes; got {len(raw):,}"
        )
    fmt = spec.format
    rows, heads = rows_per_block(spec), spec.num_kv_heads
    buffer = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    data_nbytes = rows * heads * fmt.row_elements * fmt.storage_dtype.itemsize
    data = buffer[:data_nbytes].view(fmt.storage_dtype).view(rows, heads, fmt.row_elements)
    scales = None
    if fmt.is_quantized:
        scales = buffer[data_nbytes:].view(torch.float16).view(rows, heads, fmt.num_scales)
    return BlockData(data, scales)


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
