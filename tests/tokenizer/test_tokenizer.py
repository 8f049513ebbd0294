"""kvlm's Tokenizer against the transformers oracle on the same GGUF files, plus error cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import gguf
import pytest

from kvlm.tokenizer import Tokenizer, TokenizerError
from kvlm.tokenizer.gguf_backend import build_backend, derive_merges
from kvlm.tokenizer.gguf_vocab import GGUFVocab

_LONGEST_TOPICS = sorted(topics, key=lambda k: len(topics[k]))[-3:]
PROSE = [topics[k] for k in sorted(topics)[::8]] + [topics[k] for k in _LONGEST_TOPICS]
CODE = [
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", a[i]); }',
    "SELECT name, COUNT(*) FROM users WHERE id<>3 GROUP BY name;",
]
EDGE = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t\tx",
    "12345 3.14159",
    "a  b   c    d\n\n e\t\tf \r\n g",
    " leading space",
    "trailing spaces   ",
    "I'm sure you'll see it's 100%!!! ... ???",
]
UNICODE = [
    "héllo wörld, café naïve résumé Ångström",
    "日本語のテキストです。中文文本。한국어 텍스트",
    "emoji 😀🫨👍🏽 👨‍👩‍👧 done",
    "Ελληνικά и русский текст, עברית, العربية",
    "rare scripts 𓀀𓀁 ꙮ \u200b zero-width",
]
SPECIAL = [
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos> <|endoftext|> <pad><unk>",
    "<table><tr><td>cell</td></tr></table>",
]
TEXTS = PROSE + CODE + EDGE + UNICODE + SPECIAL

EXPECTED = {  # what each GGUF says, checked once here so other tests can rely on it
    "smollm2": dict(vocab_size=49152, bos=1, eos=2, add_bos=False, stop={2}, template=True),
    # The GGUF carries no template: kvlm's built-in Gemma one, whose <end_of_turn> (106) stops
    "gemma3": dict(vocab_size=262144, bos=2, eos=1, add_bos=True, stop={1, 106}, template=True),
}


def _ids(out: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    return list(out) if isinstance(out, list) else list(out["input_ids"])


def test_encode_matches_transformers(ours: Tokenizer, oracle: Any) -> None:
    mismatches = [
        (text[:60], add_special)
        for text in TEXTS
        for add_special in (True, False)
        if ours.encode(text, add_special) != oracle.encode(text, add_special_tokens=add_special)
    ]
    assert mismatches == []


def test_decode_matches_transformers(ours: Tokenizer, oracle: Any) -> None:
    for text in TEXTS:
        ids = oracle.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == oracle.decode(ids, skip_special_tokens=skip), text


def test_metadata(model: str, ours: Tokenizer) -> None:
    want = EXPECTED[model]
    assert ours.vocab_size == want["vocab_size"]
    assert (ours.bos_token_id, ours.eos_token_id) == (want["bos"], want["eos"])
    assert ours.add_bos is want["add_bos"]
    assert ours.stop_token_ids == want["stop"]
    assert (ours.chat_template is not None) is want["template"]


def test_bos_only_with_special_tokens(ours: Tokenizer) -> None:
    plain = ours.encode("Hello", add_special_tokens=False)
    assert ours.encode("Hello") == ([ours.bos_token_id] if ours.add_bos else []) + plain
    assert ours.encode("", add_special_tokens=False) == []


@pytest.mark.parametrize(
    ("model", "text", "token_id"),
    [
        ("smollm2", "<|im_start|>", 1),
        ("smollm2", "<|im_end|>", 2),
        ("smollm2", "<|endoftext|>", 0),
        ("gemma3", "<start_of_turn>", 105),
        ("gemma3", "<end_of_turn>", 106),
        ("gemma3", "<bos>", 2),
    ],
)
def test_special_token_is_one_id(ours: Tokenizer, text: str, token_id: int) -> None:
    assert ours.encode(text, add_special_tokens=False) == [token_id]
    assert ours.decode([token_id], skip_special_tokens=False) == text
    assert ours.decode([token_id], skip_special_tokens=True) == ""


def test_id_to_token_matches_transformers(ours: Tokenizer, oracle: Any) -> None:
    ids = [0, 1, 2, 100, 1000, 12345, ours.vocab_size - 1]
    ids += oracle.encode("Hello wörld 😀\n\n  x")
    assert [ours.id_to_token(i) for i in ids] == oracle.convert_ids_to_tokens(ids)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        ours.id_to_token(ours.vocab_size)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about café 😀 and 日本."},
    ],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three\n\nFour  five"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    our_tokenizers: dict[str, Tokenizer],
    oracle_tokenizers: dict[str, Any],
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
) -> None:
    ours, oracle = our_tokenizers["smollm2"], oracle_tokenizers["smollm2"]
    text = ours.apply_chat_template(messages, add_generation_prompt)
    assert text == oracle.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    expected = oracle.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert ours.encode_chat(messages, add_generation_prompt) == _ids(expected)
    assert text.endswith("<|im_start|>assistant\n") is add_generation_prompt


def test_empty_conversation_is_rejected(our_tokenizers: dict[str, Tokenizer]) -> None:
    with pytest.raises(TokenizerError, match="empty"):
        our_tokenizers["smollm2"].apply_chat_template([])


@pytest.fixture(scope="session")
def hf_dirs(oracle_tokenizers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    dirs = {}
    for name, oracle in oracle_tokenizers.items():
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        oracle.save_pretrained(str(folder))
        dirs[name] = folder
    return dirs


def test_hf_dir_round_trip(
    model: str, ours: Tokenizer, oracle: Any, hf_dirs: dict[str, Path]
) -> None:
    from_dir = Tokenizer.from_hf_dir(hf_dirs[model])
    assert from_dir.vocab_size == ours.vocab_size
    assert (from_dir.bos_token_id, from_dir.eos_token_id) == (ours.bos_token_id, ours.eos_token_id)
    assert from_dir.add_bos == ours.add_bos
    if ours.chat_template_origin == "model files":
        assert from_dir.chat_template == ours.chat_template
        assert from_dir.stop_token_ids == ours.stop_token_ids
    else:  # built-in templates are chosen by a GGUF's architecture; a folder gets none
        assert from_dir.chat_template is None
        assert from_dir.stop_token_ids < ours.stop_token_ids
    for text in EDGE + UNICODE + SPECIAL + PROSE[:3]:
        ids = oracle.encode(text)
        assert from_dir.encode(text) == ids, text
        assert from_dir.decode(ids, False) == oracle.decode(ids), text
    if from_dir.chat_template is not None:
        for messages in CONVERSATIONS:
            assert from_dir.encode_chat(messages) == ours.encode_chat(messages)


def test_hf_dir_chat_template_sources(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = hf_dirs["smollm2"]
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    config = '{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, '
    config += '"add_bos_token": true, "chat_template": [{"name": "default", "template": '
    config += '"{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"}]}'
    (tmp_path / "tokenizer_config.json").write_text(config)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos and tok.encode("hi")[0] == 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"
    assert tok.stop_token_ids == {0, 2}
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        Tokenizer.from_hf_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm"])
def test_byte_level_splits_match_transformers(smollm2_path: Path, pre: str) -> None:
    """The regex splits for other byte-level vocabularies, checked on SmolLM2's tokens."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    vocab = dataclasses.replace(GGUFVocab.from_file(smollm2_path), pre=pre)
    assert vocab.token_types is not None and vocab.merges is not None
    tokenizer_dict = {
        "tokenizer_type": "gpt2",
        "pre_tokenizer_type": pre,
        "tokens": vocab.tokens,
        "merges": vocab.merges,
        "token_type": vocab.token_types.tolist(),
    }
    oracle, _ = mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    ours = build_backend(vocab)
    for text in CODE + EDGE + UNICODE + ["I'LL go 1234567 times\r\n\r\n  ok"]:
        want = oracle.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False).ids == want, text


def test_derive_merges_ranks_by_token_id() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    pieces = {t: i for i, t in enumerate(tokens)}
    assert derive_merges(tokens, pieces) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


# --- errors -------------------------------------------------------------------------------


def write_gguf(path: Path, **tokenizer: Any) -> Path:
    """A GGUF holding only metadata: general.architecture plus the given tokenizer fields."""
    writer = gguf.GGUFWriter(str(path), tokenizer.pop("arch", "llama"))
    if "model" in tokenizer:
        writer.add_tokenizer_model(tokenizer["model"])
    if "pre" in tokenizer:
        writer.add_tokenizer_pre(tokenizer["pre"])
    if "tokens" in tokenizer:
        writer.add_token_list(tokenizer["tokens"])
    if "token_types" in tokenizer:
        writer.add_token_types(tokenizer["token_types"])
    if "merges" in tokenizer:
        writer.add_token_merges(tokenizer["merges"])
    if "bos" in tokenizer:
        writer.add_bos_token_id(tokenizer["bos"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY = dict(model="gpt2", pre="gpt-2", tokens=["a", "b", "ab"], merges=["a b"])


def test_tiny_byte_level_gguf(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", **TINY))
    assert tok.encode("abba") == [2, 1, 0]
    assert tok.decode([2, 1, 0]) == "abba"
    assert tok.vocab_size == 3 and tok.bos_token_id is None and not tok.add_bos


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(TINY, model="bert"), "tokenizer model 'bert'.*supported: 'gpt2'"),
        (dict(TINY, model="llama", arch="llama"), "'llama'.*architecture 'llama'.*not supported"),
        (dict(TINY, pre="tekken"), "pre-tokenizer 'tekken' is not supported"),
        ({}, "has no tokenizer"),
        (dict(model="gpt2"), "no string array tokenizer.ggml.tokens"),
        (dict(TINY, token_types=[1, 1]), "token_type has 2 entries but"),
        (dict(TINY, bos=7), "bos token id 7 is outside the vocabulary of 3"),
        (dict(TINY, merges=[]), "needs tokenizer.ggml.merges"),
        (dict(TINY, merges=["a b c"]), "malformed merge"),
    ],
)
def test_bad_gguf_raises(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    path = write_gguf(tmp_path / "bad.gguf", **fields)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gguf(path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all, just some bytes")
    with pytest.raises(TokenizerError, match="not a GGUF file"):
        Tokenizer.from_gguf(path)
    path.write_bytes(b"")
    with pytest.raises(TokenizerError, match="cannot read GGUF file|not a GGUF file"):
        Tokenizer.from_gguf(path)


def test_truncated_gguf(smollm2_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(200_000))  # cuts the token list short
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.from_gguf(path)
