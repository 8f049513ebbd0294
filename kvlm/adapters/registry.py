"""The engine's prefix-tuning adapters, each computed once into pinned blocks of the cache.

Registering an adapter takes ceil(P / block_size) blocks in every layer group, writes the
adapter's per-layer K/V into them through the stores (so they are kept in the cache's own KV
format: float, int8, int4 or fp8), names the full ones and pins them all. Requests of the
adapter then start with a `VirtualPrefix` of P placeholder tokens whose blocks they share.
Two names for the same adapter files share one set of blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from kvlm.adapters.prefix_tuning import PrefixTuningAdapter, load_prefix_adapter
from kvlm.config import ModelConfig
from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.pinned import PinnedRun, VirtualPrefix
from kvlm.kv.store import KVStore

PLACEHOLDER_TOKEN_ID = 0  # stands for a virtual position in token_ids; never embedded


class PrefixAdapters:
    def __init__(
        self,
        cache: KVCacheManager,
        stores: Sequence[KVStore],
        model_config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.cache = cache
        self.stores = list(stores)
        self.model_config = model_config
        self.dtype = dtype
        self.device = device
        self.prefixes: dict[str, VirtualPrefix] = {}
        self._by_digest: dict[str, VirtualPrefix] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.prefixes)

    def get(self, name: str) -> VirtualPrefix | None:
        return self.prefixes.get(name)

    def register(self, name: str, path: str | Path) -> VirtualPrefix:
        """Load the adapter at `path` and put its K/V in pinned blocks, once."""
        assert name not in self.prefixes, f"adapter {name!r} is already registered"
        adapter = load_prefix_adapter(name, path, self.model_config, self.dtype)
        same = self._by_digest.get(adapter.digest)
        if same is None:
            same = self._by_digest[adapter.digest] = self._place(adapter)
        prefix = VirtualPrefix(name, same.token_ids, same.hash_key, same.block_hashes, same.run)
        self.prefixes[name] = prefix
        return prefix

    def _place(self, adapter: PrefixTuningAdapter) -> VirtualPrefix:
        num_tokens = adapter.num_virtual_tokens
        token_ids = (PLACEHOLDER_TOKEN_ID,) * num_tokens
        hash_key = f"prefix-tuning:{adapter.digest}"
        hashes: list[bytes] = []
        extend_block_hashes(hashes, token_ids, num_tokens, self.cache.block_size, None, (hash_key,))
        run = PinnedRun(self.cache.allocate_pinned(num_tokens, hashes))
        self._write(adapter, run)
        return VirtualPrefix(adapter.name, token_ids, hash_key, tuple(hashes), run)

    def _write(self, adapter: PrefixTuningAdapter, run: PinnedRun) -> None:
        """Store the adapter's keys (as given: PEFT never rotates them) and values."""
        block_size = self.cache.block_size
        positions = torch.arange(adapter.num_virtual_tokens)  # [P]
        for group, store in enumerate(self.stores):
            block_ids = torch.tensor(run.block_ids(group))
            rows = block_ids[positions // block_size] * store.rows_per_block
            rows = (rows + positions % block_size).to(self.device)  # [P] base rows
            for layer in store.spec.layer_ids:
                keys = adapter.keys[layer].to(self.device)  # [P, nkv, hd]
                values = adapter.values[layer].to(self.device)  # [P, nkv, hd]
                store.write(layer, rows, keys, values)
