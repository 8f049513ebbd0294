"""StopChecker: matches across chunk boundaries, earliest wins, include/exclude, holdback."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlm.sampling import SamplingParams, StopChecker, StopMatch


def stream(checker: StopChecker, chunks: list[str]) -> tuple[str, list[str], StopMatch | None]:
    """Feed chunks as the engine would: (final text, what was streamed after each chunk, match)."""
    text = ""
    streamed: list[str] = []
    for chunk in chunks:
        text += chunk
        match = checker.check(text, len(chunk))
        if match is not None:
            final = text[: match.truncate_at]
            streamed.append(final)
            return final, streamed, match
        streamed.append(text[: len(text) - checker.holdback(text)])
    streamed.append(text)  # finished for another reason: flush the held-back tail
    return text, streamed, None


def test_match_within_one_chunk() -> None:
    checker = StopChecker(["STOP"])
    assert checker.check("hello STOP world", len("hello STOP world")) == StopMatch("STOP", 6, 6)


def test_match_across_chunk_boundaries() -> None:
    checker = StopChecker(["</end>"])
    final, streamed, match = stream(checker, ["Hi <", "/e", "n", "d> tail"])
    assert match == StopMatch("</end>", 3, 3)
    assert final == "Hi "
    assert streamed == ["Hi ", "Hi ", "Hi ", "Hi "]


def test_include_stop_str_in_output() -> None:
    checker = StopChecker(["</end>"], include_stop_str_in_output=True)
    final, streamed, match = stream(checker, ["Hi <", "/e", "nd> tail"])
    assert match == StopMatch("</end>", 3, 9)
    assert final == "Hi </end>"
    # Nothing is held back: the cut can only fall after the stop string.
    assert streamed == ["Hi <", "Hi </e", "Hi </end>"]


def test_earliest_start_wins_over_list_order() -> None:
    checker = StopChecker(["world", "o w"])
    assert checker.check("hello world", 11) == StopMatch("o w", 4, 4)


def test_same_start_prefers_shorter_stop() -> None:
    checker = StopChecker(["abc", "ab"], include_stop_str_in_output=True)
    assert checker.check("xxabcx", 4) == StopMatch("ab", 2, 4)


def test_search_region_is_limited_to_new_text() -> None:
    checker = StopChecker(["ab"])
    # An old, already-checked "ab" at 0 is outside the region (the caller would have stopped).
    assert checker.check("ab__", 2) is None
    # ... but a match straddling the boundary is found: region starts len("ab") - 1 before.
    assert checker.check("__a" + "b", 1) == StopMatch("ab", 2, 2)


def test_no_stop_strings_or_no_new_text() -> None:
    assert StopChecker([]).check("anything", 8) is None
    assert StopChecker([]).holdback("anything") == 0
    assert StopChecker(["x"]).check("x", 0) is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="new_text_len must be in"):
        StopChecker(["x"]).check("abc", 4)
    with pytest.raises(ValueError, match="non-empty strings"):
        StopChecker(["x", ""])


def test_holdback() -> None:
    checker = StopChecker(["</end>", "##"])
    assert checker.holdback("text </e") == 3
    assert checker.holdback("text #") == 1
    assert checker.holdback("text <") == 1
    assert checker.holdback("text") == 0
    assert checker.holdback("</end") == 5  # longest proper prefix is len - 1
    assert checker.holdback("") == 0
    assert StopChecker(["</end>"], include_stop_str_in_output=True).holdback("a </e") == 0


def test_from_params() -> None:
    checker = StopChecker.from_params(SamplingParams(stop="\n\n", include_stop_str_in_output=True))
    assert checker.stop == ("\n\n",)
    assert checker.include_stop_str_in_output
    assert StopChecker.from_params(SamplingParams()).stop == ()


ALPHABET = "ab<>"
stop_strings = st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3)
chunk_lists = st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(stops=stop_strings, chunks=chunk_lists, include=st.booleans())
def test_streaming_never_shows_text_that_is_later_cut(
    stops: list[str], chunks: list[str], include: bool
) -> None:
    checker = StopChecker(stops, include_stop_str_in_output=include)
    final, streamed, match = stream(checker, chunks)

    # Everything streamed is a prefix of the final text, and the stream only grows.
    for before, after in pairwise(streamed):
        assert after.startswith(before)
    assert streamed[-1] == final

    # Reference: the first prefix (at a chunk boundary) holding any stop string is cut at the
    # earliest occurrence in it; shorter stop string first on a tie.
    text = ""
    expected = None
    for chunk in chunks:
        text += chunk
        found = [(text.find(s), len(s), s) for s in stops if s in text]
        if found:
            start, length, stop = min(found)
            expected = StopMatch(stop, start, start + length if include else start)
            break
    assert match == expected
    if match is None:
        assert final == "".join(chunks)
    elif not include:
        assert not any(s in final for s in stops)
