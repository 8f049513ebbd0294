"""Engine settings, checked once at start-up with messages that say what to change."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from kvlm.engine.speculative import SpeculativeConfig, SpeculativeConfigError
from kvlm.engine.weight_format import AUTO, WEIGHT_FORMAT_CHOICES
from kvlm.kv.offload.spec import OffloadSpecError, parse_offload
from kvlm.sizes import SizeError, parse_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How K/V are stored: "auto" follows the model's dtype; see kvlm.kv.quant for the integer formats.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "int4", "fp8")
DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_KV_CACHE_MEMORY = 1 << 30  # 1 GiB


class EngineConfigError(ValueError):
    """An engine setting is invalid or does not fit the model or the memory budget."""


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    use_cache: bool = True  # False: the no-cache baseline, recomputing every step
    block_size: int = 16
    kv_cache_memory: int | str = DEFAULT_KV_CACHE_MEMORY
    max_model_len: int | None = None  # None: the model's context, capped at 8,192
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds torch's global RNG for requests without their own seed
    # torch's CPU threads (process-wide). Under oversubscription (other busy processes on the
    # cores) OpenMP barriers stall every op: on 2 shared cores decode fell ~30x with 2 threads.
    num_threads: int | None = None
    kv_cache_dtype: str = "auto"
    # Every layer attends to at most this many recent tokens (the model's own windows, e.g.
    # Gemma 3's 512, are kept where smaller); blocks behind every window go back to the pool.
    sliding_window: int | None = None
    # StreamingLLM: keep the first `attention_sinks` tokens beside the window (needs a window).
    attention_sinks: int = 0
    # "float" dequantizes at load (the exact path the oracle tests use); "gguf" keeps GGUF
    # blocks quantized for kvlm's CPU kernels; "q8_0" / "q4_1" also quantize float weights.
    # "auto": "gguf" for a GGUF file on a CPU where the AVX2 / AVX-512 kernels run, else
    # "float" (kvlm.engine.weight_format); the engine's config holds the resolved value.
    weight_format: str = AUTO
    # Decode steps on quantized weights run the decoder stack as one C++ call where it applies
    # (kvlm.engine.fused_decode); False keeps the layer-by-layer torch path (the same math;
    # float rounding differs, and int8 activation blocks can round the other way).
    fused_decode: bool = True
    # PEFT prefix-tuning adapters, {name: folder}: each one's K/V is computed once into pinned
    # blocks, and requests naming the adapter attend to it (kvlm.adapters). Kept as sorted
    # (name, folder) pairs, so the config stays hashable.
    prefix_adapters: Mapping[str, str | Path] | tuple[tuple[str, str], ...] = ()
    # Offload tiers for blocks evicted from the pool, e.g. "ram:2GiB,disk:/tmp/kv:20GiB,
    # redis://127.0.0.1:6379" (see kvlm.kv.offload.spec); None: evicted blocks are gone.
    kv_offload: str | None = None
    # Speculative decoding, a dict as vLLM's speculative_config: {"method": "ngram",
    # "num_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4} (kvlm.engine.speculative);
    # kept as a SpeculativeConfig. None: one token per step.
    speculative: Mapping[str, object] | SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise EngineConfigError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.weight_format not in WEIGHT_FORMAT_CHOICES:
            raise EngineConfigError(
                f"weight_format must be one of {', '.join(WEIGHT_FORMAT_CHOICES)}, "
                f"got {self.weight_format!r}"
            )
        if self.weight_format not in (AUTO, "float") and self.dtype != "float32":
            raise EngineConfigError(
                f"weight_format {self.weight_format!r} computes in float32 on kvlm's kernels; "
                f"use dtype float32, or weight_format float for dtype {self.dtype}"
            )
        if self.weight_format not in (AUTO, "float") and self.torch_device.type != "cpu":
            raise EngineConfigError(
                f"weight_format {self.weight_format!r} runs on kvlm's CPU kernels; on "
                f"{self.torch_device.type} use weight_format float (--weight-format float)"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise EngineConfigError(f"sliding_window must be >= 1 token, got {self.sliding_window}")
        if self.attention_sinks < 0:
            raise EngineConfigError(f"attention_sinks must be >= 0, got {self.attention_sinks}")
        if self.attention_sinks and self.sliding_window is None:
            raise EngineConfigError(
                f"attention_sinks ({self.attention_sinks}) needs a sliding_window: sinks are "
                "kept beside a window of recent tokens; pass --sliding-window N too"
            )
        if self.dtype not in DTYPES:
            raise EngineConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise EngineConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise EngineConfigError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.kv_offload is not None:
            self._check_offload()
        if self.speculative is not None:
            self._check_speculative()
        pairs = dict(self.prefix_adapters).items()
        adapters = tuple(sorted(((name, str(path)) for name, path in pairs), key=str))
        object.__setattr__(self, "prefix_adapters", adapters)
        if adapters:
            self._check_prefix_adapters()
        try:
            kv_cache_memory = parse_bytes(self.kv_cache_memory)
        except SizeError as e:
            raise EngineConfigError(f"kv_cache_memory: {e}") from e
        if kv_cache_memory <= 0:
            raise EngineConfigError(
                f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}"
            )

    def _check_offload(self) -> None:
        try:
            parse_offload(str(self.kv_offload))
        except OffloadSpecError as e:
            raise EngineConfigError(str(e)) from e
        if not (self.use_cache and self.enable_prefix_caching):
            raise EngineConfigError(
                "kv_offload brings blocks back through prefix caching: it needs the KV cache "
                "and enable_prefix_caching (drop --no-cache)"
            )

    def _check_speculative(self) -> None:
        spec = self.speculative
        if not isinstance(spec, SpeculativeConfig):
            if not isinstance(spec, Mapping):
                raise EngineConfigError(
                    f"speculative must be a dict such as {{'method': 'ngram', 'num_tokens': 4}}, "
                    f"got {type(spec).__name__}"
                )
            try:
                spec = SpeculativeConfig.from_dict(spec)
            except SpeculativeConfigError as e:
                raise EngineConfigError(str(e)) from e
            object.__setattr__(self, "speculative", spec)
        if not self.use_cache:
            raise EngineConfigError(
                "speculative decoding verifies drafts over the KV cache and rolls it back: it "
                "needs the cache (drop --no-cache or the speculative setting)"
            )

    def _check_prefix_adapters(self) -> None:
        for name, _ in self.prefix_adapters:
            if not isinstance(name, str) or not name or ":" in name:
                raise EngineConfigError(
                    f"prefix adapter name {name!r} must be a non-empty string without ':' "
                    "(a server's clients ask for it as model 'base:name')"
                )
        if not (self.use_cache and self.enable_prefix_caching):
            raise EngineConfigError(
                "prefix adapters are pinned blocks found by prefix caching: they need the KV "
                "cache and enable_prefix_caching (drop --no-cache)"
            )
        if self.attention_sinks:
            raise EngineConfigError(
                "prefix adapters cannot run with attention_sinks: the sink keys score against "
                "the query at its place in the cache, not in the text, and PEFT's prefix "
                "attention has no such rule to match; drop --attention-sinks or the adapter"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
