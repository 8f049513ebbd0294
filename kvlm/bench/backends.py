"""The engines a decode benchmark can time, behind one small interface.

Each backend loads its model once (in `__init__`) and then times `run(prompts, n)`: generate
exactly `n` greedy tokens for every prompt of the batch, ignoring end-of-sequence, and note when
each position was reached. The optional ones (`hf`, `llama.cpp`) import their library lazily and
raise `BackendUnavailable`, with a reason, when it is not installed.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvlm.bench.press_spec import PressSpec
from kvlm.engine.config import EngineConfig
from kvlm.engine.llm import LLM
from kvlm.sampling import KVPress, SamplingParams

# Called with the number of positions every row has reached, as they are reached (progress bars).
OnToken = Callable[[int], None] | None


@dataclass(frozen=True)
class KVCacheOptions:
    """How kvlm's cache is laid out in a benchmark (EngineConfig's names and defaults)."""

    kv_cache_dtype: str = EngineConfig.kv_cache_dtype
    sliding_window: int | None = None
    attention_sinks: int = 0
    kv_press: KVPress | None = None  # every prompt's cache pressed once it is prefilled

    def label(self) -> str:
        """E.g. "int8 KV, window 1024 + 4 sinks", "press snapkv:0.5,window=32" (the --kv-press
        form, with the options the method reads); "" for the default cache."""
        parts = [] if self.kv_cache_dtype == "auto" else [f"{self.kv_cache_dtype} KV"]
        if self.sliding_window is not None:
            sinks = f" + {self.attention_sinks} sinks" if self.attention_sinks else ""
            parts.append(f"window {self.sliding_window}{sinks}")
        if self.kv_press is not None:
            press = self.kv_press
            parts.append(f"press {PressSpec(press.method, press.ratio, press.options()).label}")
        return ", ".join(parts)


class BackendUnavailable(RuntimeError):
    """An optional engine cannot run here (library missing); the message says why."""


@dataclass(frozen=True)
class RunTiming:
    """One timed generation of a whole batch."""

    wall_s: float  # from the call to the last token, prefill included
    num_generated_tokens: int  # over the whole batch
    prefill_s: float | None  # time to the first token (or a 1-token run's wall time)
    decode_tok_s: float | None  # generated tokens per second after the first (None: unknown)
    # [num_new_tokens]: seconds from the start until every row holds i + 1 generated tokens
    # (rows run one after another add up). Empty when the backend cannot see single tokens.
    token_times_s: tuple[float, ...] = ()

    @classmethod
    def from_token_times(cls, token_times_s: Sequence[float], batch_size: int) -> RunTiming:
        """The timing of a run whose every position's time is known."""
        times = tuple(token_times_s)
        n = len(times)
        decode_s = times[-1] - times[0]
        return cls(
            wall_s=times[-1],
            num_generated_tokens=n * batch_size,
            prefill_s=times[0],
            decode_tok_s=(n - 1) * batch_size / decode_s if n > 1 and decode_s > 0 else None,
            token_times_s=times,
        )

    def truncated(self, num_new_tokens: int, batch_size: int) -> RunTiming:
        """This run as if it had stopped after `num_new_tokens` (greedy: the same first steps)."""
        if not 1 <= num_new_tokens <= len(self.token_times_s):
            raise ValueError(
                f"a run of {len(self.token_times_s)} timed tokens cannot stand for {num_new_tokens}"
            )
        return RunTiming.from_token_times(self.token_times_s[:num_new_tokens], batch_size)


class Backend(Protocol):
    name: str
    notes: list[str]

    def run(
        self, prompts: list[list[int]], num_new_tokens: int, on_token: OnToken = None
    ) -> RunTiming: ...


class KvlmBackend:
    """kvlm itself, with its paged KV cache (`use_cache=True`) or recomputing every step."""

    def __init__(
        self,
        model: str,
        dtype: str,
        use_cache: bool,
        max_num_seqs: int,
        num_threads: int | None = None,
        weight_format: str = EngineConfig.weight_format,
        cache: KVCacheOptions = KVCacheOptions(),
    ) -> None:
        self.name = "kvlm" if use_cache else "kvlm-no-cache"
        self.notes: list[str] = []
        max_num_seqs = max(max_num_seqs, EngineConfig.max_num_seqs)  # the whole batch at once
        self.llm = LLM(
            model=model,
            dtype=dtype,
            use_cache=use_cache,
            max_num_seqs=max_num_seqs,
            num_threads=num_threads,
            weight_format=weight_format,
            kv_cache_dtype=cache.kv_cache_dtype,
            sliding_window=cache.sliding_window,
            attention_sinks=cache.attention_sinks,
        )
        self.kv_press = cache.kv_press
        self._num_runs = 0

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def run(
        self, prompts: list[list[int]], num_new_tokens: int, on_token: OnToken = None
    ) -> RunTiming:
        params = SamplingParams(
            max_tokens=num_new_tokens, temperature=0.0, ignore_eos=True, kv_press=self.kv_press
        )
        engine = self.llm.engine
        # A fresh salt per run: no run reuses the prefix cached by an earlier one.
        self._num_runs += 1
        salt = f"bench-{self._num_runs}"
        start = time.perf_counter()
        counts = {engine.add_request(None, ids, params, cache_salt=salt): 0 for ids in prompts}
        times: list[float] = []
        while engine.has_unfinished():
            for output in engine.step():
                counts[output.request_id] += len(output.outputs[0].token_ids)
            now = time.perf_counter() - start
            times += [now] * (min(counts.values()) - len(times))
            if on_token is not None:
                on_token(len(times))
        assert list(counts.values()) == [num_new_tokens] * len(prompts), (
            f"asked {num_new_tokens}, got {list(counts.values())}"
        )
        return RunTiming.from_token_times(times, len(prompts))


class HFBackend:
    """transformers' `generate` on the same GGUF (dequantized at load), in this process."""

    def __init__(self, model_path: Path, dtype: str, device: str = "cpu") -> None:
        try:
            import torch
            import transformers
        except ImportError as e:
            raise BackendUnavailable(f"transformers not installed ({e})") from e
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.name = "hf"
        self.notes = [
            f"transformers {transformers.__version__}, generate() with a streamer noting when "
            "each token arrives"
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
        self.device = device
        self.model = model.to(device).eval()
        self.pad_token_id = self.model.generation_config.eos_token_id
        if isinstance(self.pad_token_id, list):
            self.pad_token_id = self.pad_token_id[0]

    def run(
        self, prompts: list[list[int]], num_new_tokens: int, on_token: OnToken = None
    ) -> RunTiming:
        torch = self._torch
        # [batch, prompt_len]; rows are equally long
        input_ids = torch.tensor(prompts, device=self.device)
        streamer = _TokenClock(time.perf_counter(), on_token)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=num_new_tokens,
                min_new_tokens=num_new_tokens,  # bans EOS until then: a fixed length
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_token_id,
                streamer=streamer,
            )
        num_generated = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
        expected = num_new_tokens * len(prompts)
        assert num_generated == expected, f"asked {expected} tokens, got {num_generated}"
        return RunTiming.from_token_times(streamer.token_times(), len(prompts))


class _TokenClock:
    """A transformers streamer that notes when each generated position arrives.

    `generate` puts the prompt first (ignored), then each step's tokens for the whole batch."""

    def __init__(self, start: float, on_token: OnToken) -> None:
        self._start = start
        self._on_token = on_token
        self._prompt_seen = False
        self._times: list[float] = []

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self._times.append(time.perf_counter() - self._start)
            if self._on_token is not None:
                self._on_token(len(self._times))
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def token_times(self) -> list[float]:
        return self._times


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python on the same GGUF, rows one after another.

    End-of-sequence is banned by a logit bias of -inf (what `logit_bias` does in llama-cpp-python's
    own completion API), so every run generates exactly the tokens asked for."""

    def __init__(self, model_path: Path, num_ctx: int, num_threads: int) -> None:
        try:
            import llama_cpp
            import numpy as np
        except ImportError as e:
            raise BackendUnavailable(
                f"llama_cpp module not importable ({e}); pip install 'kvlm[bench]' "
                "(llama-cpp-python)"
            ) from e
        if model_path.is_dir():
            raise BackendUnavailable(f"llama.cpp needs a .gguf file, not the folder {model_path}")
        self.name = "llama.cpp"
        self.notes = [
            f"llama-cpp-python {llama_cpp.__version__}, n_threads={num_threads}, on the GGUF's "
            "quantized weights as stored; batch rows run one after another"
        ]
        self.llm = llama_cpp.Llama(
            model_path=str(model_path), n_threads=num_threads, n_ctx=num_ctx, verbose=False
        )
        eos = self.llm.token_eos()

        def ban_eos(input_ids: Any, scores: Any) -> Any:  # scores: [vocab_size] float32
            scores[eos] = -np.inf
            return scores

        self._processors = llama_cpp.LogitsProcessorList([ban_eos])

    def run(
        self, prompts: list[list[int]], num_new_tokens: int, on_token: OnToken = None
    ) -> RunTiming:
        total = [0.0] * num_new_tokens  # row times add up: rows run one after another
        for row, ids in enumerate(prompts):
            self.llm.reset()  # forget the last prompt, or `generate` would reuse its prefix
            start = time.perf_counter()
            tokens = self.llm.generate(ids, temp=0.0, top_k=1, logits_processor=self._processors)
            for i, _ in enumerate(tokens):
                total[i] += time.perf_counter() - start
                if on_token is not None and row == len(prompts) - 1:
                    on_token(i + 1)
                if i + 1 == num_new_tokens:
                    break
        return RunTiming.from_token_times(total, len(prompts))
