"""Offload tiers on a real engine: a prefix evicted from the pool comes back from RAM, from disk
and from a real Redis with the very logits a pool hit gives (and a fresh computation's tokens);
Redis killed mid-run loses no request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvlm import LLM
from kvlm.sampling import SamplingParams

BLOCK_SIZE = 16
GREEDY = SamplingParams(max_tokens=4, temperature=0)
PREFIX = list(range(1000, 1150))  # 150 tokens: 9 whole blocks can be reused
OTHER = list(range(3000, 3240))  # 240 tokens: with PREFIX's blocks, more than the pool holds


def small_llm(kv_offload: str) -> LLM:
    """A pool of 17 blocks (272 tokens), so one long prompt evicts another. Float weights: a
    fresh prefill and a prefix hit run other attention kernels, whose float rounding the int8
    activation quantization of gguf weights can amplify into another greedy token."""
    return LLM(
        "smollm2",
        kv_cache_memory="12MiB",
        max_model_len=256,
        num_threads=1,
        kv_offload=kv_offload,
        weight_format="float",
    )


class LogitsRecorder:
    """Keeps the logits of every step the runner takes (what the sampler sees)."""

    def __init__(self, llm: LLM) -> None:
        self.steps: list[torch.Tensor] = []
        runner = llm.engine.runner
        run = runner.run

        def recorded(batch):  # noqa: ANN001, ANN202
            logits, sampled = run(batch)
            self.steps.append(logits.clone())
            return logits, sampled

        runner.run = recorded  # type: ignore[method-assign]

    def generate(self, llm: LLM, token_ids: list[int]) -> tuple[list[int], torch.Tensor, int]:
        """(tokens, logits of every sampled step stacked, prompt tokens taken from the cache)."""
        self.steps.clear()
        out = llm.generate({"prompt_token_ids": token_ids}, GREEDY)[0]
        return out.outputs[0].token_ids, torch.cat(self.steps), out.metrics.num_cached_tokens


def _tier_spec(kind: str, tmp_path: Path, redis_url: str | None) -> str:
    return {"ram": "ram:64MiB", "disk": f"disk:{tmp_path}:64MiB", "redis": redis_url}[kind]


@pytest.fixture
def redis_or_none(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.node.callspec.params["kind"] != "redis":
        yield None
        return
    yield request.getfixturevalue("redis_server").url


@pytest.mark.parametrize("kind", ["ram", "disk", "redis"])
def test_evicted_prefix_comes_back_with_identical_logits(
    kind: str, tmp_path: Path, redis_or_none: str | None
) -> None:
    llm = small_llm(_tier_spec(kind, tmp_path, redis_or_none))
    try:
        rec = LogitsRecorder(llm)
        fresh_tokens, fresh_logits, cached = rec.generate(llm, PREFIX)
        assert cached == 0
        pool_tokens, pool_logits, cached = rec.generate(llm, PREFIX)  # a pool prefix hit
        hit = (len(PREFIX) - 1) // BLOCK_SIZE * BLOCK_SIZE
        assert cached == hit
        rec.generate(llm, OTHER)  # evicts PREFIX's blocks into the tier
        # The pool keeps at most the prefix's head (freed last); the rest went to the tier.
        in_pool = llm.engine.kv_cache.find_cached_prefix(_hashes(), len(PREFIX)).num_tokens
        assert in_pool <= BLOCK_SIZE
        assert llm.engine.offload.flush(timeout=30)
        tier_tokens, tier_logits, cached = rec.generate(llm, PREFIX)
        [snapshot] = llm.engine.offload.snapshot()
        assert snapshot.name == kind and snapshot.hits == (hit - in_pool) // BLOCK_SIZE
        assert cached == hit  # no recomputation of the restored blocks
        assert torch.equal(tier_logits, pool_logits)  # the same K/V bytes, the same logits
        assert tier_tokens == pool_tokens == fresh_tokens
        torch.testing.assert_close(tier_logits, fresh_logits, atol=1e-3, rtol=0)
        llm.engine.kv_cache.check_integrity()
    finally:
        llm.engine.close()


def _hashes() -> list[bytes]:
    from kvlm.kv.block_hash import extend_block_hashes

    hashes: list[bytes] = []
    extend_block_hashes(hashes, PREFIX, len(PREFIX), BLOCK_SIZE, None)
    return hashes


def test_killing_redis_mid_run_loses_no_request(redis_server) -> None:  # noqa: ANN001
    llm = small_llm(redis_server.url)
    engine = llm.engine
    try:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        prompts = [list(range(100 * i, 100 * i + 120)) for i in range(1, 7)]
        ids = [engine.add_request(None, p, params) for p in prompts]
        finished: dict[str, str] = {}
        num_steps = 0
        while engine.has_unfinished():
            if num_steps == 6:
                redis_server.process.kill()  # mid-run: requests running, blocks being evicted
                redis_server.process.wait(timeout=10)
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.outputs[0].finish_reason
            num_steps += 1
        assert finished == {i: "length" for i in ids}
        # After the kill, a new request still runs (its lookup fails, it recomputes).
        again = llm.generate({"prompt_token_ids": prompts[0]}, params)[0]
        assert again.outputs[0].finish_reason == "length"
        engine.offload.flush(timeout=30)
        [snapshot] = engine.offload.snapshot()
        assert snapshot.failures >= 1
        engine.kv_cache.check_integrity()
    finally:
        engine.close()


def _evict_everything(llm: LLM) -> None:
    """Hand every free block out once: each cached block is evicted (to the tiers)."""
    for pool in llm.engine.kv_cache.pools:
        pool.release(pool.take(pool.num_free_blocks))


@pytest.mark.slow
def test_gemma3_both_layer_groups_come_back_from_ram() -> None:
    """Two layer groups, one of them a 512-token window: a 600-token prefix's global blocks
    and the local group's blocks inside the window come back, with identical logits."""
    llm = LLM("gemma3-270m", max_model_len=1024, num_threads=1, kv_offload="ram:1GiB")
    try:
        rec = LogitsRecorder(llm)
        prompt = list(range(2000, 2600))
        fresh_tokens, fresh_logits, _ = rec.generate(llm, prompt)
        pool_tokens, pool_logits, hit = rec.generate(llm, prompt)
        assert hit == (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
        _evict_everything(llm)
        assert llm.engine.offload.flush(timeout=60)
        tier_tokens, tier_logits, cached = rec.generate(llm, prompt)
        assert cached == hit
        assert torch.equal(tier_logits, pool_logits)
        assert tier_tokens == pool_tokens == fresh_tokens
        [ram] = llm.engine.offload.snapshot()
        assert ram.hits == 2 * hit // BLOCK_SIZE  # each block of both groups, from RAM
        llm.engine.kv_cache.check_integrity()
    finally:
        llm.engine.close()


def test_a_request_waiting_on_a_load_does_not_stall_others() -> None:
    """While one request's blocks are being fetched (the tier held back here), another request
    is admitted and decodes; tier writes held back never stop the steps either."""
    llm = small_llm("ram:64MiB")
    engine = llm.engine
    [ram] = engine.offload.tiers.tiers
    try:
        llm.generate({"prompt_token_ids": PREFIX}, GREEDY)
        _evict_everything(llm)  # PREFIX's blocks go to RAM
        assert engine.offload.flush(timeout=30)
        llm.generate({"prompt_token_ids": OTHER}, GREEDY)  # cached blocks for later evictions
        fetch_gate, write_gate = threading.Event(), threading.Event()
        get_many, put = ram._get_many, ram._put

        def held_get(keys):  # noqa: ANN001, ANN202
            fetch_gate.wait(30)
            return get_many(keys)

        def held_put(key, blob):  # noqa: ANN001, ANN202
            write_gate.wait(30)
            return put(key, blob)

        ram._get_many, ram._put = held_get, held_put
        waiting = engine.add_request(None, PREFIX, GREEDY)
        other = engine.add_request(None, list(range(7000, 7040)), GREEDY)
        outputs: dict[str, list] = {waiting: [], other: []}
        for _ in range(6):  # the other request runs to its end meanwhile
            for out in engine.step():
                outputs[out.request_id].append(out)
        assert outputs[other] and outputs[other][-1].finished
        assert outputs[waiting] == [] and waiting in engine.scheduler.loading
        fetch_gate.set()
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id].append(out)
        assert outputs[waiting][-1].finished
        assert outputs[waiting][-1].metrics.num_cached_tokens == (len(PREFIX) - 1) // 16 * 16
        assert not engine.offload.flush(timeout=0)  # evictions' writes are still held back
        write_gate.set()
        assert engine.offload.flush(timeout=30)
        engine.kv_cache.check_integrity()
    finally:
        fetch_gate.set()
        write_gate.set()
        engine.close()


def test_a_damaged_disk_block_is_refused_dropped_and_stored_again(tmp_path: Path) -> None:
    llm = small_llm(f"disk:{tmp_path}:64MiB")
    engine = llm.engine
    try:
        fresh = llm.generate({"prompt_token_ids": PREFIX}, GREEDY)[0].outputs[0].token_ids
        _evict_everything(llm)
        assert engine.offload.flush(timeout=30)
        damaged = tmp_path / f"{engine.cache_identity.block_key(0, _hashes()[3]).hex()}.kv"
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0x01
        damaged.write_bytes(bytes(data))

        out = llm.generate({"prompt_token_ids": PREFIX}, GREEDY)[0]
        assert out.metrics.num_cached_tokens == 3 * BLOCK_SIZE  # blocks 0-2; 3 on are recomputed
        assert out.outputs[0].token_ids == fresh
        [disk] = engine.offload.snapshot()
        assert disk.failures == 1 and not damaged.exists()

        _evict_everything(llm)  # the recomputed block 3 is stored again ...
        assert engine.offload.flush(timeout=30) and damaged.exists()
        again = llm.generate({"prompt_token_ids": PREFIX}, GREEDY)[0]  # ... and found
        assert again.metrics.num_cached_tokens == (len(PREFIX) - 1) // BLOCK_SIZE * BLOCK_SIZE
        assert again.outputs[0].token_ids == fresh
    finally:
        engine.close()
