"""Shared contexts registered by name: a document or a system prompt computed once, pinned.

Classification, summarisation and question answering over one document all start with its
tokens. Once registered, the document's full blocks stay in the pool however full it gets, so
every request that starts with its tokens gets them as a prefix hit and prefills only its own
tail, until the prefix is unregistered. Requests that merely share a prefix get the same reuse
from plain prefix caching, for as long as the pool keeps the blocks.

Registered prefixes may share blocks (a system prompt, and a document that starts with it):
each prefix holds a pin on its blocks (the cache counts them), so a block stays pinned while
any registered prefix lists it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlm.engine.engine import InputError
from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.cache_manager import BlockIds, KVCacheManager


@dataclass(frozen=True)
class RegisteredPrefix:
    name: str
    token_ids: tuple[int, ...]
    num_pinned_tokens: int  # its full blocks' tokens: what a request starting with it reuses
    block_ids: BlockIds  # per layer group, the blocks it pins


class TaskPrefixes:
    def __init__(self, cache: KVCacheManager | None) -> None:
        self.cache = cache
        self.prefixes: dict[str, RegisteredPrefix] = {}

    def check_new(self, name: str, token_ids: Sequence[int]) -> KVCacheManager:
        """Refuse a name in use, a cache that cannot pin, and text shorter than one block."""
        if name in self.prefixes:
            raise InputError(f"prefix {name!r} is already registered; unregister it first")
        if self.cache is None or not self.cache.enable_prefix_caching:
            raise InputError(
                "registered prefixes are pinned cache blocks found by prefix caching: they "
                "need the KV cache and enable_prefix_caching"
            )
        if len(token_ids) < self.cache.block_size:
            raise InputError(
                f"prefix {name!r} has {len(token_ids)} tokens, fewer than one block of "
                f"{self.cache.block_size}: there is nothing to pin"
            )
        return self.cache

    def pin(self, name: str, token_ids: Sequence[int]) -> RegisteredPrefix:
        """Pin the cached full blocks of `token_ids`, computed just before (the caller runs
        the prefill: `LLM.register_prefix`)."""
        cache = self.check_new(name, token_ids)
        hashes: list[bytes] = []
        extend_block_hashes(hashes, token_ids, len(token_ids), cache.block_size, None)
        num_full = len(hashes) * cache.block_size
        hit = cache.find_cached_prefix(hashes, num_full + 1)  # every full block, none held back
        if hit.num_tokens < num_full:
            raise InputError(
                f"prefix {name!r}: only {hit.num_tokens} of its {num_full} full-block tokens "
                "stayed in the KV pool after its prefill; raise kv_cache_memory"
            )
        block_ids = cache.pin(hit)  # a window group pins only its window (and sinks)
        prefix = RegisteredPrefix(name, tuple(token_ids), num_full, block_ids)
        self.prefixes[name] = prefix
        return prefix

    def unpin(self, name: str) -> None:
        """Take the prefix's pins off its blocks: those no other prefix pins stay cached until
        the pool needs them."""
        prefix = self.prefixes.pop(name, None)
        if prefix is None:
            known = ", ".join(map(repr, sorted(self.prefixes))) or "none"
            raise InputError(f"no prefix named {name!r} is registered (registered: {known})")
        assert self.cache is not None
        self.cache.unpin(prefix.block_ids)
