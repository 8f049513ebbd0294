"""The tokenizer description stored in a GGUF file, read once and checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys

from kvlm.loading.gguf_file import GGUFFormatError, read_gguf_metadata
from kvlm.tokenizer.errors import TokenizerError

K = Keys.Tokenizer


@dataclass(frozen=True)
class GGUFVocab:
    """Everything a GGUF says about its tokenizer, under llama.cpp's names.

    Invariants (checked in `__post_init__`): `tokens` is non-empty; `token_types` and `scores`,
    when present, have one entry per token; every special id is a valid index into `tokens`.
    `tokens` are spelled as in the file (byte-level alphabet for "gpt2", "▁" for "llama").
    """

    source: str  # file path, for messages
    name: str  # general.name, else the file name
    architecture: str
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    pre: str | None  # tokenizer.ggml.pre: which pre-tokenizer split the BPE was trained with
    tokens: list[str]
    token_types: np.ndarray | None  # int32 per token, values of gguf.TokenType
    scores: np.ndarray | None  # float32 per token
    merges: list[str] | None  # "left right", best first
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    eot_token_ids: tuple[int, ...]  # end-of-turn / end-of-message ids the file names, if any
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def __post_init__(self) -> None:
        num_tokens = len(self.tokens)
        if num_tokens == 0:
            raise TokenizerError(f"GGUF file {self.source} has an empty {K.LIST}")
        for key, array in ((K.TOKEN_TYPE, self.token_types), (K.SCORES, self.scores)):
            if array is not None and len(array) != num_tokens:
                raise TokenizerError(
                    f"GGUF file {self.source} is corrupt: {key} has {len(array)} entries "
                    f"but {K.LIST} has {num_tokens}"
                )
        specials = {
            "bos": self.bos_token_id,
            "eos": self.eos_token_id,
            "unk": self.unk_token_id,
            "pad": self.pad_token_id,
        }
        specials.update({f"eot[{i}]": t for i, t in enumerate(self.eot_token_ids)})
        for label, token_id in specials.items():
            if token_id is not None and not 0 <= token_id < num_tokens:
                raise TokenizerError(
                    f"GGUF file {self.source} is corrupt: {label} token id {token_id} is outside "
                    f"the vocabulary of {num_tokens} tokens"
                )

    def ids_of_type(self, token_type: int) -> list[int]:
        """Ids whose gguf.TokenType equals `token_type`, ascending; empty without types."""
        if self.token_types is None:
            return []
        return np.flatnonzero(self.token_types == token_type).tolist()

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    @classmethod
    def from_file(cls, path: str | Path) -> GGUFVocab:
        """Read and check the tokenizer fields of a GGUF file; raise TokenizerError if absent."""
        path = Path(path)
        try:
            meta = read_gguf_metadata(path, lambda key: key.startswith(("general.", "tokenizer.")))
        except GGUFFormatError as e:
            raise TokenizerError(str(e)) from e
        return cls.from_metadata(meta, str(path), default_name=path.name)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str, default_name: str) -> GGUFVocab:
        model = meta.get(K.MODEL)
        if not isinstance(model, str):
            raise TokenizerError(
                f"GGUF file {source} has no tokenizer ({K.MODEL} is missing); "
                "kvlm needs the vocabulary stored in the file"
            )
        tokens = meta.get(K.LIST)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens[:1]):
            raise TokenizerError(f"GGUF file {source} has no string array {K.LIST}")
        merges = meta.get(K.MERGES)
        if merges is not None and not isinstance(merges, list):
            raise TokenizerError(f"GGUF file {source}: {K.MERGES} is not a string array")

        def optional_id(key: str) -> int | None:
            value = meta.get(key)
            return None if value is None else int(value)

        eot_ids = tuple(i for i in (optional_id(K.EOT_ID), optional_id(K.EOM_ID)) if i is not None)
        chat_template = meta.get(K.CHAT_TEMPLATE)
        return cls(
            source=source,
            name=str(meta.get("general.name") or default_name),
            architecture=str(meta.get("general.architecture", "")),
            model=model,
            pre=meta.get(K.PRE),
            tokens=tokens,
            token_types=_numeric(meta.get(K.TOKEN_TYPE), K.TOKEN_TYPE, source),
            scores=_numeric(meta.get(K.SCORES), K.SCORES, source),
            merges=merges,
            bos_token_id=optional_id(K.BOS_ID),
            eos_token_id=optional_id(K.EOS_ID),
            unk_token_id=optional_id(K.UNK_ID),
            pad_token_id=optional_id(K.PAD_ID),
            eot_token_ids=eot_ids,
            # SentencePiece ("llama") vocabularies add BOS unless the file says otherwise,
            # as llama.cpp and transformers both assume.
            add_bos=bool(meta.get(K.ADD_BOS, model == "llama")),
            add_eos=bool(meta.get(K.ADD_EOS, False)),
            chat_template=chat_template if isinstance(chat_template, str) else None,
        )


def _numeric(value: Any, key: str, source: str) -> np.ndarray | None:
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise TokenizerError(f"GGUF file {source}: {key} is not a numeric array")
    return value
