"""Beam search parameters, with vLLM's `BeamSearchParams` field names; the search itself
follows transformers' `generate(num_beams=…, do_sample=False)` (kvlm/engine/beam_search.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvlm.sampling.errors import SamplingParamsError, check_int
from kvlm.sampling.params import _check_bool, _check_float


@dataclass(frozen=True)
class BeamSearchParams:
    """`beam_width` beams over at most `max_tokens` generated tokens each.

    A finished hypothesis is ranked by its summed log-probability divided by
    (generated tokens, its end-of-sequence token included) ** `length_penalty`: above 0
    favours longer ones. `early_stopping` is transformers' rule for when the search ends:
    True, as soon as `beam_width` hypotheses are finished; False, once the best running beam
    at its current length cannot beat the worst finished one; "never", the same test with the
    best length a beam could still reach (`max_tokens`) when `length_penalty` > 0.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    # 0 scores the model's own log-probabilities; above 0 divides the logits by it first.
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    def __post_init__(self) -> None:
        check_int("beam_width", self.beam_width)
        if self.beam_width < 1:
            raise SamplingParamsError(f"beam_width must be >= 1, got {self.beam_width}")
        check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be >= 1, got {self.max_tokens}")
        _check_bool("ignore_eos", self.ignore_eos)
        if _check_float("temperature", self.temperature) < 0:
            raise SamplingParamsError(
                f"temperature must be >= 0 (0 = the model's log-probabilities), "
                f"got {self.temperature!r}"
            )
        _check_float("length_penalty", self.length_penalty)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise SamplingParamsError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
