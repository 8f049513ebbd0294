"""The engines a decode benchmark can time, behind one small interface.

Each backend loads its model once (in `__init__`) and then times `run(prompts, n)`: generate
exactly `n` greedy tokens for every prompt of the batch, ignoring end-of-sequence. The optional
ones (`hf`, `llama.cpp`) import their library lazily and raise `BackendUnavailable`, with a
reason, when it is not installed.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvlm.engine.config import EngineConfig
from kvlm.engine.llm import LLM
from kvlm.sampling import SamplingParams


class BackendUnavailable(RuntimeError):
    """An optional engine cannot run here (library missing); the message says why."""


@dataclass(frozen=True)
class RunTiming:
    """One timed generation of a whole batch."""

    wall_s: float  # from the call to the last token, prefill included
    num_generated_tokens: int  # over the whole batch
    prefill_s: float | None  # time to the first token (or a 1-token run's wall time)
    decode_tok_s: float | None  # generated tokens per second after the first (None: unknown)


class Backend(Protocol):
    name: str
    notes: list[str]

    def run(self, prompts: list[list[int]], num_new_tokens: int) -> RunTiming: ...


class KvlmBackend:
    """kvlm itself, with its paged KV cache (`use_cache=True`) or recomputing every step."""

    def __init__(self, model: str, dtype: str, use_cache: bool, max_num_seqs: int) -> None:
        self.name = "kvlm" if use_cache else "kvlm-no-cache"
        self.notes: list[str] = []
        max_num_seqs = max(max_num_seqs, EngineConfig.max_num_seqs)  # the whole batch at once
        self.llm = LLM(model=model, dtype=dtype, use_cache=use_cache, max_num_seqs=max_num_seqs)
        self._num_runs = 0

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def run(self, prompts: list[list[int]], num_new_tokens: int) -> RunTiming:
        params = SamplingParams(max_tokens=num_new_tokens, temperature=0.0, ignore_eos=True)
        inputs = [{"prompt_token_ids": ids} for ids in prompts]
        # A fresh salt per run: no run reuses the prefix cached by an earlier one.
        self._num_runs += 1
        start = time.perf_counter()
        outputs = self.llm.generate(inputs, params, cache_salt=f"bench-{self._num_runs}")
        wall = time.perf_counter() - start
        metrics = [o.metrics for o in outputs]
        counts = [m.num_generated_tokens for m in metrics]
        assert counts == [num_new_tokens] * len(prompts), f"asked {num_new_tokens}, got {counts}"
        first = [m.first_token_time for m in metrics]
        finish = [m.finish_time for m in metrics]
        assert None not in first and None not in finish
        # Decode window: from the last request's first token to the last request's finish.
        decode_s = max(finish) - max(first)  # type: ignore[type-var]
        decode_tokens = sum(counts) - len(counts)
        return RunTiming(
            wall_s=wall,
            num_generated_tokens=sum(counts),
            prefill_s=max(first) - start,  # type: ignore[operator]
            decode_tok_s=decode_tokens / decode_s if decode_tokens and decode_s > 0 else None,
        )


class HFBackend:
    """transformers' `generate` on the same GGUF (dequantized to float32), in this process."""

    def __init__(self, model_path: Path, dtype: str) -> None:
        try:
            import torch
            import transformers
        except ImportError as e:
            raise BackendUnavailable(f"transformers not installed ({e})") from e
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.name = "hf"
        self.notes = [
            f"transformers {transformers.__version__}; decode tok/s = (N-1)·batch / "
            "(wall(N) - wall(1)), a 1-token run standing in for prefill"
        ]
        self._torch = torch
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
        if model_path.is_dir():
            source = str(model_path)
        else:
            source, kwargs["gguf_file"] = str(model_path.parent), model_path.name
        # The GGUF conversion draws a tqdm bar no transformers setting turns off.
        with contextlib.redirect_stderr(io.StringIO()):
            model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
        self.model = model.eval()
        self.pad_token_id = self.model.generation_config.eos_token_id
        if isinstance(self.pad_token_id, list):
            self.pad_token_id = self.pad_token_id[0]

    def _generate(self, input_ids: Any, num_new_tokens: int) -> tuple[float, int]:
        torch = self._torch
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=num_new_tokens,
                min_new_tokens=num_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_token_id,
            )
        wall = time.perf_counter() - start
        num_generated = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
        return wall, num_generated

    def run(self, prompts: list[list[int]], num_new_tokens: int) -> RunTiming:
        input_ids = self._torch.tensor(prompts)  # [batch, prompt_len]; rows are equally long
        wall, num_generated = self._generate(input_ids, num_new_tokens)
        expected = num_new_tokens * len(prompts)
        assert num_generated == expected, f"asked {expected} tokens, got {num_generated}"
        prefill, _ = self._generate(input_ids, 1)
        decode_s = wall - prefill
        decode_tokens = (num_new_tokens - 1) * len(prompts)
        return RunTiming(
            wall_s=wall,
            num_generated_tokens=num_generated,
            prefill_s=prefill,
            decode_tok_s=decode_tokens / decode_s if decode_tokens and decode_s > 0 else None,
        )


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python on the same GGUF, 2 threads, rows one at a time."""

    def __init__(self, model_path: Path, num_ctx: int, num_threads: int = 2) -> None:
        try:
            import llama_cpp
        except ImportError as e:
            raise BackendUnavailable(
                f"llama_cpp module not importable ({e}); pip install llama-cpp-python"
            ) from e
        if model_path.is_dir():
            raise BackendUnavailable(f"llama.cpp needs a .gguf file, not the folder {model_path}")
        self.name = "llama.cpp"
        self.notes = [
            f"llama-cpp-python {llama_cpp.__version__}, n_threads={num_threads}, on the GGUF's "
            "quantized weights as stored (kvlm and hf dequantize them); batch rows run one "
            "after another"
        ]
        self.llm = llama_cpp.Llama(
            model_path=str(model_path), n_threads=num_threads, n_ctx=num_ctx, verbose=False
        )

    def run(self, prompts: list[list[int]], num_new_tokens: int) -> RunTiming:
        walls, prefills, decode_rates = [], [], []
        for ids in prompts:
            start = time.perf_counter()
            first = None
            self.llm.reset()  # forget the last prompt, or `generate` would reuse its prefix
            # `generate` yields tokens until told to stop; it never stops at EOS by itself.
            tokens = self.llm.generate(ids, temp=0.0, top_k=1)
            for count, _ in enumerate(tokens, start=1):
                first = first or time.perf_counter()
                if count == num_new_tokens:
                    break
            end = time.perf_counter()
            assert first is not None
            walls.append(end - start)
            prefills.append(first - start)
            if num_new_tokens > 1 and end > first:
                decode_rates.append((num_new_tokens - 1) / (end - first))
        return RunTiming(
            wall_s=sum(walls),
            num_generated_tokens=num_new_tokens * len(prompts),
            prefill_s=statistics.mean(prefills),
            decode_tok_s=statistics.mean(decode_rates) if decode_rates else None,
        )
