"""An engine's memory goes back when its LLM is deleted, without waiting for the garbage
collector: a reference cycle through the engine (once: the structured-outputs tokenizer
factory, a closure over the engine) kept a deleted engine's weights and KV pool alive until a
collection happened to run, and the test suite's peak RSS grew by each engine a test made."""

from __future__ import annotations

import gc
import weakref

from kvlm import LLM, SamplingParams
from kvlm.sampling import StructuredOutputsParams


def test_a_deleted_llm_frees_its_engine_without_the_garbage_collector() -> None:
    gc.collect()
    gc.disable()
    try:
        llm = LLM("smollm2", weight_format="float", max_model_len=256, kv_cache_memory="16MiB")
        plain = SamplingParams(max_tokens=4, temperature=0)
        digits = SamplingParams(
            max_tokens=4, temperature=0, structured_outputs=StructuredOutputsParams(regex="[0-9]+")
        )
        [free, constrained] = llm.generate(["The year is", "The year is"], [plain, digits])
        assert constrained.outputs[0].text.isdigit() and free.outputs[0].token_ids
        engine, model = weakref.ref(llm.engine), weakref.ref(llm.engine.model)
        del llm, free, constrained
        assert engine() is None and model() is None
    finally:
        gc.enable()
