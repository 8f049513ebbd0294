"""Block names: an encoding no two different (parent, salt, tokens, extra keys) can share."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvlm.kv.block_hash import (
    decode_block_key,
    encode_block_key,
    extend_block_hashes,
    hash_block,
)

# Pairs the old name (salt and tokens fed to blake2b back to back) could not tell apart.
COLLIDING = [
    ((None, [12, 3, 4, 5], None), (None, [2, 3, 4, 5], "1")),
    ((None, [12, 3, 4, 5], "tenant-1"), (None, [2, 3, 4, 5], "tenant-11")),
    ((None, [1, 23], None), (None, [12, 3], None)),  # digits moving between token ids
    ((None, [5], ""), (None, [5], None)),  # an empty salt is a salt
]


@pytest.mark.parametrize(("a", "b"), COLLIDING)
def test_digit_shifts_name_different_blocks(a: tuple, b: tuple) -> None:
    assert hash_block(*a) != hash_block(*b)


def test_extra_keys_are_apart_from_the_salt() -> None:
    tokens = [0] * 16
    adapter = hash_block(None, tokens, None, ("prefix-tuning:abc",))
    assert adapter != hash_block(None, tokens, "prefix-tuning:abc")
    assert hash_block(None, tokens, "x", ("y",)) != hash_block(None, tokens, "x\0y")
    assert hash_block(None, tokens, None, ("a", "b")) != hash_block(None, tokens, None, ("ab",))


def test_names_chain_their_parent() -> None:
    first = hash_block(None, [1, 2])
    assert hash_block(first, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(first, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    with pytest.raises(ValueError, match="16 bytes"):
        hash_block(b"short", [1])


def test_extend_names_full_blocks_only() -> None:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, list(range(40)), 40, 16, "s")
    assert len(hashes) == 2
    assert hashes[1] == hash_block(hashes[0], list(range(16, 32)), "s")
    extend_block_hashes(hashes, list(range(48)), 48, 16, "s")
    assert len(hashes) == 3 and hashes[2] == hash_block(hashes[1], list(range(32, 48)), "s")


parents = st.one_of(st.none(), st.binary(min_size=16, max_size=16))
token_lists = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=40)
salts = st.one_of(st.none(), st.text(max_size=12))
extras = st.lists(st.text(max_size=8), max_size=3)


@given(parents, token_lists, salts, extras)
def test_the_key_decodes_back_to_its_fields(
    parent: bytes | None, tokens: list[int], salt: str | None, extra: list[str]
) -> None:
    """Decodable means injective: two different inputs cannot share a key."""
    key = encode_block_key(parent, tokens, salt, extra)
    assert decode_block_key(key) == (parent, tokens, salt, extra)


fields = st.tuples(parents, token_lists, salts, extras)


@given(fields, fields)
def test_different_fields_give_different_keys(a: tuple, b: tuple) -> None:
    if a != b:
        assert encode_block_key(*a) != encode_block_key(*b)


def test_a_key_of_another_version_is_refused() -> None:
    key = bytearray(encode_block_key(None, [1]))
    key[len(b"kvlm-block-key")] = 1
    with pytest.raises(ValueError, match="naming version"):
        decode_block_key(bytes(key))
