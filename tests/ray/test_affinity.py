"""Which replica a prompt goes to (pure Python, no Ray): the longest placed prefix wins, a new
prefix goes to its consistent-hash owner, and a replica leaving moves only its own prompts."""

from __future__ import annotations

import pytest

from kvlm.kv.block_hash import extend_block_hashes
from kvlm.ray_serve.affinity import HashRing, PrefixAffinity

BLOCK_SIZE = 16


def _hashes(token_ids: list[int], salt: str | None = None) -> list[bytes]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, len(token_ids), BLOCK_SIZE, salt)
    return hashes


def _keys(n: int) -> list[bytes]:
    return [_hashes(list(range(i * 100, i * 100 + 16)))[0] for i in range(n)]


def test_removing_a_replica_moves_only_the_keys_it_owned() -> None:
    keys = _keys(2000)
    four = HashRing(["a", "b", "c", "d"])
    three = HashRing(["a", "b", "d"])
    moved = [k for k in keys if four.owner(k) != three.owner(k)]
    assert moved and all(four.owner(k) == "c" for k in moved)
    assert all(three.owner(k) != "c" for k in keys)


def test_the_ring_spreads_keys_over_replicas() -> None:
    ring = HashRing([f"r{i}" for i in range(4)])
    counts = {f"r{i}": 0 for i in range(4)}
    for k in _keys(4000):
        counts[ring.owner(k)] += 1
    assert all(700 < c < 1300 for c in counts.values()), counts  # fair share: 1,000


def test_the_replica_sent_the_longest_prefix_is_the_favourite() -> None:
    affinity = PrefixAffinity()
    document = list(range(5000, 5160))  # 10 blocks
    affinity.placed(_hashes(document[:64]), "a")  # blocks 0-3 went to a
    affinity.placed(_hashes(document[:32] + list(range(90, 122))), "b")  # 0-1 again, to b
    question = _hashes(document + list(range(100, 140)))
    assert affinity.favourite(question, ["a", "b"]) == "a"  # a was sent 4 of its blocks
    assert affinity.favourite(_hashes(document[:32] + [7] * 32), ["a", "b"]) == "b"
    assert affinity.favourite(question, ["b", "c"]) == "b"  # a is gone: b has 2 blocks
    other_tenant = _hashes(document, salt="t")  # another salt: nothing placed
    assert affinity.favourite(other_tenant, ["a", "b"]) == HashRing(["a", "b"]).owner(
        other_tenant[-1]
    )


def test_a_prompt_without_a_full_block_has_no_favourite() -> None:
    assert PrefixAffinity().favourite(_hashes(list(range(15))), ["a", "b"]) is None
    assert PrefixAffinity().favourite(_hashes(list(range(32))), []) is None


def test_the_oldest_placements_are_forgotten_first() -> None:
    affinity = PrefixAffinity(max_tracked_blocks=4)
    first, second = _hashes(list(range(48))), _hashes(list(range(1000, 1048)))
    # A peer the ring gives first[1] to, so that "a" below can only come from memory.
    peer = next(r for r in (f"p{i}" for i in range(64)) if HashRing(["a", r]).owner(first[1]) == r)
    affinity.placed(first, "a")
    affinity.placed(second, peer)  # 3 + 3 blocks: the first 2 of `first` drop
    assert affinity.num_tracked_blocks == 4
    assert affinity.favourite(first[:2], ["a", peer]) == peer  # forgotten: the ring decides
    assert affinity.favourite(first, ["a", peer]) == "a"
    with pytest.raises(ValueError, match="max_tracked_blocks"):
        PrefixAffinity(0)
