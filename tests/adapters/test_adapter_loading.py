"""Reading adapter files, and placing their K/V in pinned blocks of every KV format."""

from __future__ import annotations

import json

import pytest
import torch
from peft_adapters import write_adapter
from safetensors.torch import load_file

from kvlm.adapters import AdapterError, load_prefix_adapter
from kvlm.adapters.registry import PrefixAdapters
from kvlm.kv.cache_manager import KVCacheManager
from kvlm.kv.quant import fp8_supported
from kvlm.kv.spec import layer_groups
from kvlm.kv.store import KVStore

CPU = torch.device("cpu")
KV_FORMATS = ["float32", "bfloat16", "int8", "int4", "fp8"]


def test_layout_is_pefts(smollm2_config, tmp_path):
    """Row 2l of the [P, L * 2, heads, hd] view is layer l's keys, row 2l + 1 its values."""
    folder = write_adapter(tmp_path / "ad", smollm2_config, 3, seed=0)
    adapter = load_prefix_adapter("ad", folder, smollm2_config, torch.float32)
    raw = load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]
    c = smollm2_config
    view = raw.view(3, c.num_layers * 2, c.num_kv_heads, c.head_dim)
    assert torch.equal(adapter.keys[5], view[:, 10])
    assert torch.equal(adapter.values[5], view[:, 11])
    assert adapter.num_virtual_tokens == 3


@pytest.mark.parametrize("kv_format", KV_FORMATS)
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_prefix_is_stored_pinned_and_named_in_every_group(request, tmp_path, model, kv_format):
    if kv_format == "fp8" and not fp8_supported(CPU):
        pytest.skip("no float8 in this torch")
    config = request.getfixturevalue(f"{model}_config")
    specs = layer_groups(config, 16, kv_format)
    cache = KVCacheManager(specs, [8] * len(specs))
    stores = [KVStore(spec, 8, torch.float32, CPU) for spec in specs]
    adapters = PrefixAdapters(cache, stores, config, torch.float32, CPU)
    folder = write_adapter(tmp_path / "ad", config, 21, seed=4)
    prefix = adapters.register("ad", folder)
    twin = adapters.register("twin", folder)  # the same files: the same blocks
    assert twin.run is prefix.run and adapters.names == ["ad", "twin"]
    adapter = load_prefix_adapter("ad", folder, config, torch.float32)
    assert len(prefix.block_hashes) == 1 and prefix.num_tokens == 21
    positions = torch.arange(21)
    for group, (store, pool) in enumerate(zip(stores, cache.pools, strict=True)):
        blocks = [pool.blocks[i] for i in prefix.run.blocks[group]]
        assert len(blocks) == 2 and all(b.pinned and b.ref_count == 1 for b in blocks)
        assert pool.cached(prefix.block_hashes[0]) is blocks[0]
        assert blocks[1].block_hash is None  # the partial block is copied, never shared
        ids = torch.tensor(prefix.run.block_ids(group))
        rows = ids[positions // 16] * store.rows_per_block + positions % 16
        for layer in store.spec.layer_ids:  # exactly what the format makes of them
            keys, values = store.gather(layer, rows)
            assert torch.equal(keys, _round_trip(store, adapter.keys[layer]))
            assert torch.equal(values, _round_trip(store, adapter.values[layer]))
        pool.check_integrity([0] * pool.num_blocks)


def _round_trip(store: KVStore, x: torch.Tensor) -> torch.Tensor:
    data, scales = store.format.quantize(x)
    return store.format.dequantize(data, scales, torch.float32)


def test_tail_copies_go_to_the_requests_block(smollm2_config, tmp_path):
    specs = layer_groups(smollm2_config, 16, "float32")
    cache = KVCacheManager(specs, [8])
    stores = [KVStore(specs[0], 8, torch.float32, CPU)]
    adapters = PrefixAdapters(cache, stores, smollm2_config, torch.float32, CPU)
    twenty = adapters.register("twenty", write_adapter(tmp_path / "a", smollm2_config, 20, 1))
    sixteen = adapters.register("sixteen", write_adapter(tmp_path / "b", smollm2_config, 16, 2))
    tail = twenty.run.blocks[0][1]
    assert twenty.tail_copies([[twenty.run.blocks[0][0], 7]]) == [(0, tail, 7)]
    assert sixteen.tail_copies([[sixteen.run.blocks[0][0], 7]]) == []


def _break(folder, edit) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "safetensors is missing"),
        (lambda f: (f / "adapter_config.json").write_text("{"), "is not JSON"),
        (lambda f: _break(f, lambda c: c.update(peft_type="LORA")), "peft_type 'LORA'"),
        (lambda f: _break(f, lambda c: c.update(task_type="SEQ_2_SEQ_LM")), "CAUSAL_LM"),
        (
            lambda f: _break(f, lambda c: c.update(num_transformer_submodules=2)),
            "encoder-decoder",
        ),
        (lambda f: _break(f, lambda c: c.update(num_layers=12)), "num_layers 12 but the model"),
        (
            lambda f: _break(f, lambda c: c.update(num_attention_heads=9)),
            "num_attention_heads 9 but the model needs 3",
        ),
        (lambda f: _break(f, lambda c: c.update(num_virtual_tokens=0)), "positive int"),
        (lambda f: _break(f, lambda c: c.update(num_virtual_tokens=5)), r"shape \(5, 11520\)"),
        (
            lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage"),
            "cannot read",
        ),
    ],
)
def test_bad_adapters_are_refused(smollm2_config, tmp_path, damage, message):
    folder = write_adapter(tmp_path / "ad", smollm2_config, 4, seed=0)
    damage(folder)
    with pytest.raises(AdapterError, match=message):
        load_prefix_adapter("ad", folder, smollm2_config, torch.float32)


def test_an_adapter_for_another_model_is_refused(smollm2_config, gemma3_config, tmp_path):
    folder = write_adapter(tmp_path / "ad", gemma3_config, 4, seed=0)
    with pytest.raises(AdapterError, match="trained for another model"):
        load_prefix_adapter("ad", folder, smollm2_config, torch.float32)
