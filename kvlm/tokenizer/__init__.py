"""Tokenizers built from GGUF vocabularies or Hugging Face folders, chat templates, and
streaming detokenization. Encodings equal transformers' for the same files."""

from kvlm.tokenizer.detokenizer import IncrementalDetokenizer
from kvlm.tokenizer.errors import TokenizerError
from kvlm.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError"]
