"""kvlm's tokenizer as llguidance's: the grammar engine reads the same `tokenizers` pipeline
(tokenizer.json text) that kvlm encodes with, whether it came from a GGUF vocabulary or an HF
folder, so every token's bytes are the ones kvlm decodes.

Building one walks the whole vocabulary into a token trie (about 0.4 s for SmolLM2's 49k
tokens, 4 s for Gemma 3's 262k on this project's machines): do it once per engine.
"""

from __future__ import annotations

from collections.abc import Collection

import llguidance

from kvlm.tokenizer.tokenizer import Tokenizer


def llguidance_tokenizer(
    tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Collection[int]
) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` for a model whose logits have `vocab_size` entries
    (masks are that wide); `eos_token_ids` are the ids that end a generation, which a grammar
    allows once its text is complete."""
    if not eos_token_ids:
        raise ValueError(f"tokenizer {tokenizer.name!r} has no end-of-sequence token to stop on")
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocabulary ({vocab_size:,} logits) is smaller than its tokenizer's "
            f"({tokenizer.vocab_size:,} tokens)"
        )
    return llguidance.LLTokenizer(
        tokenizer.to_json(), n_vocab=vocab_size, eos_token=sorted(eos_token_ids)
    )
