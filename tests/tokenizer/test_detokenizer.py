"""IncrementalDetokenizer: streamed deltas add up to the full decode, never half a character."""

from __future__ import annotations

import random

import pytest

from kvlm.tokenizer import IncrementalDetokenizer, Tokenizer

MULTIBYTE = [
    "emoji 😀🫨👍🏽 and a family 👨‍👩‍👧 🇯🇵!",
    "日本語のテキストです。中文文本。한국어 텍스트",
    "rare scripts 𓀀𓀁𓀂 ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q",
    "mixed: café ☕️ naïve 🍕🍕🍕 über 東京タワー 🗼 end",
    "😀😀😀😀😀😀😀😀",
    "plain ascii text, with  two spaces\n\nand newlines\tand tabs",
]


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", MULTIBYTE)
def test_deltas_add_up_and_hold_partial_characters(ours: Tokenizer, text: str) -> None:
    ids = ours.encode(text)
    for skip in (True, False):
        deltas = stream(ours, ids, skip)
        assert "".join(deltas) == ours.decode(ids, skip)
        assert not [d for d in deltas if "\ufffd" in d]


def test_multibyte_texts_split_characters_across_tokens(ours: Tokenizer) -> None:
    """The texts above really exercise the hold-back: some token alone is half a character."""
    ids = [i for text in MULTIBYTE for i in ours.encode(text, add_special_tokens=False)]
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    if ours.byte_fallback_ids:  # Gemma spells rare characters as <0xNN> byte tokens
        assert any(i in ours.byte_fallback_ids for i in ids)


def test_chat_stream_with_special_tokens(our_tokenizers: dict[str, Tokenizer]) -> None:
    tok = our_tokenizers["smollm2"]
    ids = tok.encode_chat(
        [{"role": "user", "content": "Hé 😀"}, {"role": "assistant", "content": "日本"}]
    )
    assert "".join(stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, True)
    kept = "".join(stream(tok, ids, skip_special_tokens=False))
    assert kept == tok.decode(ids, False) and kept.startswith("<|im_start|>system")


@pytest.mark.parametrize("seed", range(3))
def test_random_ids_add_up(ours: Tokenizer, seed: int) -> None:
    """Arbitrary ids (invalid byte runs, specials, byte tokens) still add up after flush."""
    rng = random.Random(seed)
    byte_ids = sorted(ours.byte_fallback_ids)
    for _ in range(20):
        ids = []
        for _ in range(rng.randint(1, 40)):
            roll = rng.random()
            if roll < 0.3 and byte_ids:
                ids.append(rng.choice(byte_ids))
            elif roll < 0.4:
                ids.append(rng.randrange(300))  # specials and (for Gemma) added tokens
            else:
                ids.append(rng.randrange(ours.vocab_size))
        for skip in (True, False):
            assert "".join(stream(ours, ids, skip)) == ours.decode(ids, skip), ids


def test_byte_fallback_group_is_held_until_closed(our_tokenizers: dict[str, Tokenizer]) -> None:
    """Gemma decodes a run of <0xNN> tokens all-or-nothing, so "中" followed by a stray
    0xFF byte turns into four U+FFFD; the detokenizer must not emit "中" early."""
    tok = our_tokenizers["gemma3"]
    byte = {tok.id_to_token(i): i for i in tok.byte_fallback_ids}
    assert len(byte) == 256
    ids = [byte[f"<0x{b:02X}>"] for b in "中".encode()] + [byte["<0xFF>"]]
    ids += tok.encode(" ok", add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == "\ufffd" * 4 + " ok"
    assert deltas[:4] == ["", "", "", ""]


def test_empty_stream(ours: Tokenizer) -> None:
    detok = IncrementalDetokenizer(ours)
    assert detok.flush() == "" and detok.text == ""


def test_decoder_that_strips_the_first_space() -> None:
    """A Metaspace decoder drops the leading "▁" of the first token it sees; streaming must
    still reproduce the spaces between words (the window starts one step back)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from kvlm.tokenizer.spec import TokenizerSpec

    pieces = ["<unk>", "▁a", "▁b", "▁c", "b"]
    backend = Backend(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    spec = TokenizerSpec(backend, "toy", None, None, False, None, {})
    tok = Tokenizer(spec)
    ids = [1, 2, 4, 3, 1]
    assert tok.decode(ids) == "a bb c a"
    assert stream(tok, ids)[:-1] == ["a", " b", "b", " c", " a"]
