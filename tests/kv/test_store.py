"""KVStore's write hook: called after each write, before a gather, and its rewrites are read."""

from __future__ import annotations

import torch

from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.store import KVStore


class _Halve:
    """Records each write and halves the written K rows in place."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def after_write(self, store: KVStore, layer_idx: int, rows: torch.Tensor) -> None:
        self.calls.append((layer_idx, rows.tolist()))
        k_off, _ = store.layer_offsets(layer_idx)
        store.data[rows + k_off] *= 0.5


def _store() -> KVStore:
    spec = KVCacheSpec((0, 3), num_kv_heads=2, head_dim=8, block_size=4, kv_format="float32")
    return KVStore(spec, 3, torch.float32, torch.device("cpu"))


def test_write_hook_sees_each_write_and_its_rewrites_are_gathered() -> None:
    store, hook = _store(), _Halve()
    store.write_hook = hook
    rows = torch.tensor([store.rows_per_block + 1, 2 * store.rows_per_block])
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    store.write(3, rows, k, v)
    assert hook.calls == [(3, rows.tolist())]
    keys, values = store.gather(3, rows)
    torch.testing.assert_close(keys, k * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(values, v, rtol=0, atol=0)


def test_no_hook_stores_as_written() -> None:
    store = _store()
    rows = torch.tensor([0, 5])
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    store.write(0, rows, k, v)
    keys, values = store.gather(0, rows)
    torch.testing.assert_close(keys, k, rtol=0, atol=0)
    torch.testing.assert_close(values, v, rtol=0, atol=0)
