"""What K/V bytes depend on, as names: a block computed under one identity is never read under
another.

A block's own hash (`block_pool.hash_block`) names its tokens, its whole prefix and its cache
salt. What else decides its bytes is the model (weights, how they are held, the compute
dtype) and the cache's layout (layer groups, KV format, block size, sinks, how keys are
roped). `CacheIdentity` names both, so that offload keys and session files carry them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kvlm.kv.block_hash import BLOCK_NAMING_VERSION
from kvlm.kv.spec import KVCacheSpec

_CHUNK = 1 << 20
# How a group with sinks stores its keys: roped by text position, as every group. Before, such
# groups stored keys unrotated; their layouts lack this, so their blocks are never read here.
SINK_KEYS = "keys=text-roped"


def model_file_digest(path: Path) -> str:
    """A digest of a model's bytes: the .gguf file, or a folder's config and weight files."""
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    )
    h = hashlib.blake2b(digest_size=16)
    for file in files:
        h.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def group_layout(spec: KVCacheSpec) -> str:
    """E.g. "layers=0..29 heads=3x64 kv=int8 block=16 window=None sinks=0", and with sinks
    "... window=1024 sinks=4 keys=text-roped" (`SINK_KEYS`)."""
    layers = ",".join(map(str, spec.layer_ids))
    layout = (
        f"layers={layers} heads={spec.num_kv_heads}x{spec.head_dim} kv={spec.kv_format} "
        f"block={spec.block_size} window={spec.window} sinks={spec.num_sinks}"
    )
    return f"{layout} {SINK_KEYS}" if spec.num_sinks else layout


def unrotated_sink_keys(layout: str) -> bool:
    """Whether a saved group layout is of a sink group whose keys were stored unrotated (an
    older kvlm's)."""
    return re.search(r" sinks=[1-9]\d*$", layout) is not None


@dataclass(frozen=True)
class CacheIdentity:
    model_fingerprint: str  # the model's bytes + dtype + weight format
    tokenizer_hash: str
    specs: tuple[KVCacheSpec, ...]

    @staticmethod
    def of(
        model_path: Path,
        dtype: str,
        weight_format: str,
        tokenizer_hash: str,
        specs: Sequence[KVCacheSpec],
    ) -> CacheIdentity:
        model = f"{model_file_digest(model_path)}:{dtype}:{weight_format}"
        return CacheIdentity(model, tokenizer_hash, tuple(specs))

    @property
    def block_size(self) -> int:
        return self.specs[0].block_size

    @property
    def kv_formats(self) -> list[str]:
        return [s.kv_format for s in self.specs]

    @property
    def layouts(self) -> list[str]:
        return [group_layout(s) for s in self.specs]

    @cached_property
    def namespaces(self) -> tuple[bytes, ...]:
        """Per layer group, a prefix for its blocks' offload keys."""
        out = []
        for g, layout in enumerate(self.layouts):
            h = hashlib.blake2b(digest_size=16)
            name = f"naming {BLOCK_NAMING_VERSION}|{self.model_fingerprint}|group {g}|{layout}"
            h.update(name.encode())
            out.append(h.digest())
        return tuple(out)

    def block_key(self, group: int, block_hash: bytes) -> bytes:
        """The offload key of a block: its hash (tokens, prefix, salt) under this identity."""
        return self.namespaces[group] + block_hash
