"""Choosing tokens: per-request `SamplingParams`, the batched `Sampler`, stop-string checks."""

from kvlm.sampling.params import SamplingParams, SamplingParamsError
from kvlm.sampling.sampler import Logprob, Sampler, SamplerOutput, make_generator
from kvlm.sampling.stop import StopChecker, StopMatch

__all__ = [
    "Logprob",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingParamsError",
    "StopChecker",
    "StopMatch",
    "make_generator",
]
