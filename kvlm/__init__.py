"""kvlm: an LLM inference engine whose centre is the KV cache."""

from kvlm import openmp  # noqa: F401, I001 (first: before anything loads torch)
from kvlm.engine.engine import InputError
from kvlm.engine.llm import LLM
from kvlm.engine.request import CompletionOutput, RequestOutput
from kvlm.sampling import KVPress, SamplingParams, StructuredOutputsParams
from kvlm.sampling.beam import BeamSearchParams

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "InputError",
    "KVPress",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]
