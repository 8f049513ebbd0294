"""Choosing tokens: per-request `SamplingParams`, the batched `Sampler`, stop-string checks,
and structured outputs (`StructuredOutputsParams`; the grammar engine is in `structured.py`)."""

from kvlm.sampling.params import SamplingParams, SamplingParamsError
from kvlm.sampling.press import KVPress, KVPressError
from kvlm.sampling.sampler import Logprob, RowMask, Sampler, SamplerOutput, make_generator
from kvlm.sampling.stop import StopChecker, StopMatch
from kvlm.sampling.structured_params import StructuredOutputsParams

__all__ = [
    "KVPress",
    "KVPressError",
    "Logprob",
    "RowMask",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingParamsError",
    "StopChecker",
    "StopMatch",
    "StructuredOutputsParams",
    "make_generator",
]
