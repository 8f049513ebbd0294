"""Request outputs are deltas: each hands out only what is new, stop strings are cut from the
tail alone, and `OutputAccumulator` assembles the whole (what `LLM.generate` returns)."""

from __future__ import annotations

import random

import pytest

from kvlm.engine.request import OutputAccumulator, Request, RequestStatus, TextBuffer
from kvlm.sampling import Logprob, SamplingParams


def _request(**params: object) -> Request:
    return Request("r", "prompt", [1, 2, 3], SamplingParams(**params), detokenizer=None)  # type: ignore[arg-type]


def test_text_buffer_matches_a_plain_string() -> None:
    rng = random.Random(0)
    for _ in range(500):
        buffer, reference = TextBuffer(), ""
        for _ in range(rng.randint(0, 10)):
            if rng.random() < 0.7:
                piece = "".join(rng.choice("ab") for _ in range(rng.randint(0, 4)))
                buffer.append(piece)
                reference += piece
            else:
                length = rng.randint(0, len(reference))
                buffer.truncate(length)
                reference = reference[:length]
            n = rng.randint(-1, len(reference) + 1)
            assert buffer.tail(n) == (reference[-n:] if n > 0 else "")
            assert buffer.text_from(n) == reference[max(n, 0) :]
            assert len(buffer) == len(reference)
        assert buffer.text() == reference


def test_outputs_are_deltas_and_hold_back_a_possible_stop_string() -> None:
    request = _request(stop=["STOP"], logprobs=0)
    deltas = []
    for token_id, piece in [(10, "Hello "), (11, "S"), (12, "T"), (13, " no")]:
        request.token_ids.append(token_id)
        request.logprobs.append({token_id: Logprob(-0.5, 1)})
        assert request.append_text(piece) is None
        deltas.append(request.to_output())
    texts = [d.outputs[0].text for d in deltas]
    assert texts == ["Hello ", "", "", "ST no"]  # "S", "ST" might have become "STOP"
    assert [d.outputs[0].token_ids for d in deltas] == [[10], [11], [12], [13]]
    assert all(len(d.outputs[0].logprobs) == 1 for d in deltas)
    assert all(d.prompt_token_ids is deltas[0].prompt_token_ids for d in deltas)


def test_a_stop_string_is_cut_from_the_tail() -> None:
    request = _request(stop=["o W"])
    for piece in ["Hel", "lo", " Wor", "ld"]:
        match = request.append_text(piece)
        if match is not None:
            break
    assert match is not None and match.stop == "o W"
    assert request.text == "Hell"
    kept = _request(stop=["o W"], include_stop_str_in_output=True)
    kept.append_text("Hello")
    assert kept.append_text(" World").stop == "o W" and kept.text == "Hello W"


def test_accumulator_assembles_the_whole_output() -> None:
    request = _request(logprobs=0)
    accumulated = OutputAccumulator()
    for token_id, piece in [(7, "a"), (8, "bc"), (9, "")]:
        request.token_ids.append(token_id)
        request.logprobs.append({token_id: Logprob(-1.0, 1)})
        request.append_text(piece)
        if token_id == 9:
            request.status, request.finish_reason = RequestStatus.FINISHED, "length"
        accumulated.add(request.to_output())
    final = accumulated.build()
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert final.outputs[0].text == "abc" and final.outputs[0].token_ids == [7, 8, 9]
    assert [list(e) for e in final.outputs[0].logprobs] == [[7], [8], [9]]
    with pytest.raises(ValueError, match="no output"):
        OutputAccumulator().build()
