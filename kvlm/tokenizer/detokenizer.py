"""Streaming ids -> text without ever emitting half a character."""

from __future__ import annotations

from kvlm.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one token id at a time into the new text it completes.

    Invariant: `"".join(pushes) + flush() == tokenizer.decode(all_ids, skip_special_tokens)`,
    and `text` is that concatenation so far. A delta never ends inside a multi-byte character:
    text whose decoded tail is U+FFFD (bytes still incomplete) is held back, as is text while
    the last id with text is a "<0xNN>" byte-fallback token: a run of those decodes
    all-or-nothing, so its text is final only once a non-byte token closes it (a skipped
    special token does not close it: decode drops it and the bytes on both sides join).

    How: only the ids from `prefix_offset` on are decoded at each push. `read_offset` marks
    the end of the ids whose text is fully emitted; `prefix_offset` lags one step behind it,
    so decoders that treat the first token specially (strip a leading space) see the same
    start in both decodes and the difference is exact. `num_pending_emitted` counts the
    characters of the window already emitted beyond the decode of `ids[prefix:read]`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.num_pending_emitted = 0
        self._byte_ids = tokenizer.byte_fallback_ids
        self._special_ids = tokenizer.special_token_ids

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly "")."""
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if self.skip_special_tokens and token_id in self._special_ids:
            return ""  # adds no text, and leaves an open byte group open
        if token_id in self._byte_ids:
            return ""  # a byte group decodes all-or-nothing; wait until it is closed
        done = len(self._decode(self.prefix_offset, self.read_offset))
        window = self._decode(self.prefix_offset)
        stable = window.rstrip(_REPLACEMENT)
        start = done + self.num_pending_emitted
        delta = stable[start:] if len(stable) > start else ""
        if len(stable) == len(window):  # nothing held back: every id so far is fully emitted
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self.num_pending_emitted = 0
        else:
            self.num_pending_emitted += len(delta)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The held-back rest (e.g. a dangling partial character as U+FFFD); call once at end."""
        window = self._decode(self.prefix_offset)
        start = len(self._decode(self.prefix_offset, self.read_offset)) + self.num_pending_emitted
        delta = window[start:]
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.num_pending_emitted = 0
        self.text += delta
        return delta
