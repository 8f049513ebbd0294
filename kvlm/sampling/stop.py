"""Stop strings, checked incrementally as detokenized text streams in.

The engine's loop for one request, after appending each newly decoded piece of text:

    match = checker.check(text, len(new_piece))
    if match is not None:          # finished: the output is text[:match.truncate_at]
        ...
    else:                          # still running: safe to stream text[:len(text) - holdback]
        safe_len = len(text) - checker.holdback(text)

Invariant (given check() is called after every piece): text already streamed is never cut
later, so a client never sees part of a stop string that ends up removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlm.sampling.params import SamplingParams


@dataclass(frozen=True)
class StopMatch:
    stop: str  # the stop string that matched
    start: int  # index in the text where it begins
    truncate_at: int  # keep text[:truncate_at]: start, or start + len(stop) when it is kept


class StopChecker:
    """Finds the first stop string completed by newly appended text.

    Assumes the text before the new piece held no complete stop string (it was checked
    already), so only the region where a new match can lie is searched: the new text plus
    len(longest stop) - 1 characters before it.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.stop: tuple[str, ...] = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_len = max((len(s) for s in self.stop), default=0)  # the longest stop string

    @classmethod
    def from_params(cls, params: SamplingParams) -> StopChecker:
        return cls(tuple(params.stop or ()), params.include_stop_str_in_output)

    def check(self, text_so_far: str, new_text_len: int) -> StopMatch | None:
        """The match that starts earliest (ties: the shorter stop string), or None.

        `new_text_len` is how many characters at the end of `text_so_far` are new.
        """
        if not 0 <= new_text_len <= len(text_so_far):
            raise ValueError(
                f"new_text_len must be in [0, len(text_so_far)={len(text_so_far)}], "
                f"got {new_text_len}"
            )
        if not self.stop or new_text_len == 0:
            return None
        search_from = max(0, len(text_so_far) - new_text_len - (self.max_len - 1))
        best: tuple[int, int, str] | None = None  # (start, len, stop)
        for stop in self.stop:
            start = text_so_far.find(stop, search_from)
            if start != -1 and (best is None or (start, len(stop)) < best[:2]):
                best = (start, len(stop), stop)
        if best is None:
            return None
        start, length, stop = best
        truncate_at = start + length if self.include_stop_str_in_output else start
        return StopMatch(stop=stop, start=start, truncate_at=truncate_at)

    def holdback(self, text: str) -> int:
        """Number of trailing chars of `text` to withhold from streaming for now.

        The length of the longest suffix of `text` that is a proper prefix of some stop string
        (it might grow into a stop string and be cut). 0 when stop strings are kept in the
        output: the cut then falls after the stop string, never inside already-streamed text.
        """
        if self.include_stop_str_in_output:
            return 0
        for length in range(min(len(text), self.max_len - 1), 0, -1):
            tail = text[-length:]
            if any(len(s) > length and s.startswith(tail) for s in self.stop):
                return length
        return 0
