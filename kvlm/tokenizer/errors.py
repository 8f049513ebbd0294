"""The one exception type the tokenizer package raises for bad inputs and unsupported files."""

from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer file is unsupported, incomplete or corrupt, or a chat cannot be rendered.

    The message names the offending value and, where there is one, what to do instead.
    """
