"""Build a `tokenizers.Tokenizer` from a GGUF vocabulary, matching what transformers builds.

Two GGUF tokenizer models are supported, each rebuilt the way transformers converts it, so that
ids equal `AutoTokenizer.from_pretrained(dir, gguf_file=...)`:

* "gpt2": byte-level BPE. Tokens are spelled in the GPT-2 byte alphabet; merges come from the
  file; text is split by a regex (GPT-2's, or the one `tokenizer.ggml.pre` names) and mapped to
  that alphabet; decoding maps it back to bytes.
* "llama" on a Gemma architecture: SentencePiece-style BPE with byte fallback. Spaces become
  "▁" (no prefix space, no pre-split); the file has no merges, so they are derived from the
  vocabulary, ranked by token id (Gemma's scores do not follow its merge order).

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens, so both are matched whole in the text and `<|im_start|>` is one id.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from kvlm.tokenizer.errors import TokenizerError
from kvlm.tokenizer.gguf_vocab import GGUFVocab

SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space
GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})

# Pre-tokenizer splits for byte-level BPE, by `tokenizer.ggml.pre`. `None` means GPT-2's own
# split, built into `pre_tokenizers.ByteLevel(use_regex=True)`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_SPLITS: dict[str | None, str | None] = {
    None: None,
    "default": None,
    "gpt-2": None,
    "smollm": None,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's reversible byte -> character map, indexed by byte value.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP,
    soft hyphen) take the characters U+0100, U+0101, ... in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in chars)
    chars.update({b: chr(0x100 + n) for n, b in enumerate(others)})
    return tuple(chars[b] for b in range(256))


def build_backend(vocab: GGUFVocab) -> Tokenizer:
    """The tokenizers pipeline for `vocab`; raises TokenizerError for unsupported models."""
    builder = _builder(vocab)
    tokenizer, pieces = builder(vocab)
    _add_special_tokens(tokenizer, vocab, pieces)
    tokenizer.post_processor = template_processor(
        vocab.token(vocab.bos_token_id) if vocab.add_bos else None,
        vocab.bos_token_id,
        vocab.token(vocab.eos_token_id) if vocab.add_eos else None,
        vocab.eos_token_id,
    )
    return tokenizer


def template_processor(
    bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None
) -> processors.TemplateProcessing:
    """`[bos] $A [eos]` for single sequences, each part only when given (as transformers does)."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair_b = " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special = {t: i for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None and i is not None}
    return processors.TemplateProcessing(
        single=single, pair=f"{single} {pair_b}", special_tokens=list(special.items())
    )


_Builder = Callable[[GGUFVocab], tuple[Tokenizer, dict[str, int]]]


def _builder(vocab: GGUFVocab) -> _Builder:
    if vocab.model == "gpt2":
        if vocab.pre not in BYTE_LEVEL_SPLITS:
            known = ", ".join(sorted(str(p) for p in BYTE_LEVEL_SPLITS if p))
            raise TokenizerError(
                f"GGUF file {vocab.source}: byte-level pre-tokenizer {vocab.pre!r} is not "
                f"supported; supported tokenizer.ggml.pre values: {known}"
            )
        return _byte_level_bpe
    if vocab.model == "llama" and vocab.architecture in GEMMA_ARCHITECTURES:
        return _gemma_bpe
    raise TokenizerError(
        f"GGUF file {vocab.source}: tokenizer model {vocab.model!r} (architecture "
        f"{vocab.architecture!r}) is not supported; supported: 'gpt2' (byte-level BPE) and "
        f"'llama' (SentencePiece BPE) on architectures {', '.join(sorted(GEMMA_ARCHITECTURES))}"
    )


def _byte_level_bpe(vocab: GGUFVocab) -> tuple[Tokenizer, dict[str, int]]:
    if not vocab.merges:
        raise TokenizerError(
            f"GGUF file {vocab.source}: a 'gpt2' tokenizer needs tokenizer.ggml.merges"
        )
    alphabet = byte_alphabet()
    spelled = frozenset(alphabet)
    # A token written in plain text (some files do this for added tokens) is respelled in the
    # byte alphabet; later duplicates win, as in a dict built from the list.
    pieces = {
        t if spelled.issuperset(t) else "".join(alphabet[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(vocab.tokens)
    }
    merges = [tuple(m.split(" ")) for m in vocab.merges]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise TokenizerError(f"GGUF file {vocab.source}: malformed merge {' '.join(bad)!r}")
    model = models.BPE(
        vocab=pieces, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""
    )
    tokenizer = Tokenizer(model)
    split = BYTE_LEVEL_SPLITS[vocab.pre]
    if split is None:
        tokenizer.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre.Sequence(
            [
                pre.Split(Regex(split), behavior="isolated"),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, pieces


def _gemma_bpe(vocab: GGUFVocab) -> tuple[Tokenizer, dict[str, int]]:
    # Runs of spaces are stored as real spaces but matched after " " -> "▁" normalization.
    tokens = [SPACE_MARK * len(t) if " " in t and not t.strip() else t for t in vocab.tokens]
    pieces = {t: i for i, t in enumerate(tokens)}
    unk = vocab.token(vocab.unk_token_id) or "<unk>"
    model = models.BPE(
        vocab=pieces,
        merges=derive_merges(tokens, pieces),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE_MARK)
    # transformers also sets Split(" ", merged_with_previous), a no-op once spaces are "▁".
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer, pieces


def derive_merges(tokens: list[str], pieces: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, as a merge.

    Ranked by the id of the token the merge makes (lower id = applied first), then by longer
    left part first. Walking tokens in id order yields that ranking without a sort.
    """
    merges: list[tuple[str, str]] = []
    append = merges.append
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):
            left = token[:cut]
            if left in pieces:
                right = token[cut:]
                if right in pieces:
                    append((left, right))
    return merges


def _add_special_tokens(tokenizer: Tokenizer, vocab: GGUFVocab, pieces: dict[str, int]) -> None:
    """Control tokens (plus bos/eos/unk/pad) as special tokens, user-defined ones as plain."""
    byte_level = vocab.model == "gpt2"
    spelled = frozenset(byte_alphabet())
    special_ids = set(vocab.ids_of_type(TokenType.CONTROL))
    special_ids.update(
        i
        for i in (vocab.bos_token_id, vocab.eos_token_id, vocab.unk_token_id, vocab.pad_token_id)
        if i is not None
    )
    special = []
    for i in sorted(special_ids):
        token = vocab.tokens[i]
        # In a byte-level vocabulary a control token outside the byte alphabet is a mislabel;
        # transformers skips it (adding it would grow the vocabulary), and so do we.
        if byte_level and not spelled.issuperset(token):
            continue
        special.append(AddedToken(token, special=True, normalized=False))
    tokenizer.add_special_tokens(special)
    # A user-defined token is added only if it is spelled as in the vocabulary (Gemma's runs of
    # spaces were respelled and stay ordinary pieces).
    user = [
        AddedToken(vocab.tokens[i], special=False, normalized=False)
        for i in vocab.ids_of_type(TokenType.USER_DEFINED)
        if vocab.tokens[i] in pieces
    ]
    tokenizer.add_tokens(user)
