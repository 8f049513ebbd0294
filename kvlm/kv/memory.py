"""How much KV cache a model needs: the seeds' formula, made exact for kvlm's paged cache.

The naive multi-head figure is `2 × layers × seq × d_model × bytes` (K and V, every layer, one
`d_model`-wide row per token). kvlm stores less, and each saving is a property of a layer
group's `KVCacheSpec`, so the estimate is worked out per group from the same specs the engine
builds (`layer_groups`):

- GQA/MQA: only `num_kv_heads × head_dim` values per token and layer, not `d_model`;
- quantization: `KVFormat.nbytes` per token-head, scales included;
- sliding windows and sinks: a window group holds only the blocks its window (plus the sink
  blocks) reaches, so its memory stops growing once the sequence passes the window;
- paging: memory comes in whole blocks of `block_size` tokens.

`split_budget` is the other direction, the rule the engine sizes its pools by: a byte budget
cut between the groups in proportion to what one full-length sequence holds of each.

Pure arithmetic over `ModelConfig` and specs: no tensor is allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlm.config import ModelConfig
from kvlm.kv.quant import FLOAT_FORMATS, KVFormat
from kvlm.kv.spec import KVCacheSpec, layer_groups

# The naive figure for a quantized format uses 16-bit elements: what the same multi-head cache
# would take unquantized at half precision, so the ratio includes what quantization saves.
NAIVE_QUANTIZED_ELEMENT_BYTES = 2
_FLOAT_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
assert set(_FLOAT_ELEMENT_BYTES) == set(FLOAT_FORMATS)


class KVMemoryError(ValueError):
    """An estimate was asked for with values that make no sense (a context of 0, …)."""


@dataclass(frozen=True)
class GroupMemory:
    """One layer group's share of one sequence at its peak."""

    spec: KVCacheSpec
    num_blocks: int  # blocks one sequence holds in this group at the peak step

    @property
    def tokens_held(self) -> int:
        return self.num_blocks * self.spec.block_size

    @property
    def nbytes(self) -> int:
        """Bytes one sequence holds in this group at the peak step."""
        return self.num_blocks * self.spec.page_nbytes


@dataclass(frozen=True)
class MemoryEstimate:
    """KV memory for `batch_size` sequences of `num_tokens` tokens each.

    Invariant: `total_bytes == batch_size * sum(g.nbytes for g in groups)`, and every figure
    is block-rounded the way the engine allocates.
    """

    config: ModelConfig
    kv_format: str
    num_tokens: int
    batch_size: int
    block_size: int
    groups: tuple[GroupMemory, ...]
    peak_num_tokens: int  # tokens in the cache after the step where it holds the most bytes
    peak_num_new_tokens: int  # tokens computed in that step (> 1: a prefill chunk)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer, scales included, before windows and paging."""
        return sum(g.spec.bytes_per_token for g in self.groups)

    @property
    def bytes_per_sequence(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def total_bytes(self) -> int:
        return self.batch_size * self.bytes_per_sequence

    @property
    def naive_element_bytes(self) -> int:
        return _FLOAT_ELEMENT_BYTES.get(self.kv_format, NAIVE_QUANTIZED_ELEMENT_BYTES)

    @property
    def naive_bytes_per_token(self) -> int:
        """`2 × layers × d_model × bytes`: plain multi-head attention, every layer full."""
        c = self.config
        return 2 * c.num_layers * c.hidden_size * self.naive_element_bytes

    @property
    def naive_bytes(self) -> int:
        """`2 × layers × seq × d_model × bytes` for each of the `batch_size` sequences."""
        return self.batch_size * self.num_tokens * self.naive_bytes_per_token

    @property
    def ratio(self) -> float:
        """How many times less than the naive figure kvlm holds (> 1 means a saving)."""
        return self.naive_bytes / self.total_bytes

    def factors(self) -> dict[str, float]:
        """The naive figure times these factors, in turn, gives `total_bytes` exactly."""
        c = self.config
        kv_width = c.num_kv_heads * c.head_dim
        fmt = KVFormat(self.kv_format, c.head_dim)
        layer_tokens = sum(g.spec.num_layers * g.tokens_held for g in self.groups)
        return {
            # GQA/MQA (and a head_dim that is not d_model / num_heads): values kept per token.
            "kv_heads": kv_width / c.hidden_size,
            # Bytes per value, scales included, against the naive element.
            "format": fmt.nbytes / (c.head_dim * self.naive_element_bytes),
            # Tokens held per layer against the context: windows, sinks, prefill chunks, blocks.
            "tokens_held": layer_tokens / (c.num_layers * self.num_tokens),
        }


def _check(
    num_tokens: int, batch_size: int, block_size: int, window: int | None, sinks: int
) -> None:
    if num_tokens < 1:
        raise KVMemoryError(f"context must be >= 1 token, got {num_tokens}")
    if batch_size < 1:
        raise KVMemoryError(f"batch must be >= 1 sequence, got {batch_size}")
    if block_size < 1:
        raise KVMemoryError(f"block_size must be >= 1, got {block_size}")
    if window is not None and window < 1:
        raise KVMemoryError(f"sliding_window must be >= 1 token, got {window}")
    if sinks < 0:
        raise KVMemoryError(f"attention_sinks must be >= 0, got {sinks}")
    if sinks and window is None:
        raise KVMemoryError(
            f"attention_sinks ({sinks}) needs a sliding_window: sinks are kept beside a window "
            "of recent tokens"
        )


def _steps(
    num_tokens: int, prompt_tokens: int, prefill_chunk: int, block_size: int
) -> list[tuple[int, int]]:
    """(tokens in the cache after a step, tokens computed in it) for every step that can hold
    the most: each prefill chunk, then the last `block_size` decode steps. Past its window a
    group's decode-time count is periodic in the token count with period `block_size`, and
    smaller before the window fills, so no earlier decode step holds more."""
    steps, n = [], 0
    while n < prompt_tokens:
        chunk = min(prefill_chunk, prompt_tokens - n)
        n += chunk
        steps.append((n, chunk))
    first_decode = max(prompt_tokens + 1, num_tokens - block_size + 1)
    steps += [(m, 1) for m in range(first_decode, num_tokens + 1)]
    return steps


def estimate(
    config: ModelConfig,
    num_tokens: int,
    kv_format: str,
    batch_size: int = 1,
    block_size: int = 16,
    sliding_window: int | None = None,
    num_sinks: int = 0,
    prompt_tokens: int = 0,
    prefill_chunk: int = 2048,
) -> MemoryEstimate:
    """KV memory for `batch_size` sequences of `num_tokens` tokens each.

    Each sequence starts with a prompt of `prompt_tokens` tokens, computed in chunks of up to
    `prefill_chunk` (the engine's `max_num_batched_tokens`), then grows one decoded token a
    step to `num_tokens`. Its figure is the peak on the way: the most bytes its block tables
    hold at once. A window group holds a step's new tokens plus the window behind the first of
    them, so a long prompt chunk costs more than decoding; and its block count wobbles by one
    as the window crosses block boundaries (when `num_tokens` is a multiple of `block_size`,
    the decode peak is a step earlier).
    """
    _check(num_tokens, batch_size, block_size, sliding_window, num_sinks)
    if not 0 <= prompt_tokens <= num_tokens:
        raise KVMemoryError(
            f"prompt_tokens must be between 0 and the context ({num_tokens}), got {prompt_tokens}"
        )
    if prefill_chunk < 1:
        raise KVMemoryError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
    specs = layer_groups(config, block_size, kv_format, sliding_window, num_sinks)
    peak_step, peak_bytes = (num_tokens, 1), -1
    for step in _steps(num_tokens, prompt_tokens, prefill_chunk, block_size):
        nbytes = sum(s.max_blocks_held(*step) * s.page_nbytes for s in specs)
        if nbytes >= peak_bytes:  # ties go to the later step
            peak_step, peak_bytes = step, nbytes
    groups = tuple(GroupMemory(s, s.max_blocks_held(*peak_step)) for s in specs)
    return MemoryEstimate(
        config=config,
        kv_format=kv_format,
        num_tokens=num_tokens,
        batch_size=batch_size,
        block_size=block_size,
        groups=groups,
        peak_num_tokens=peak_step[0],
        peak_num_new_tokens=peak_step[1],
    )


@dataclass(frozen=True)
class BudgetSplit:
    """How a KV byte budget becomes blocks, group by group.

    Invariant: `num_blocks[g] == int(blocks_per_sequence[g] * num_sequences) + 1` (the null
    block), and the usable blocks' bytes never exceed the budget.
    """

    budget_bytes: int
    blocks_per_sequence: tuple[int, ...]  # per group, what one full-length sequence holds
    bytes_per_sequence: int
    num_sequences: float  # full-length sequences the budget holds at once (>= 1)
    num_blocks: tuple[int, ...]  # per group, the pool's size, the null block included


def split_budget(
    specs: Sequence[KVCacheSpec], budget_bytes: int, max_model_len: int, max_num_batched_tokens: int
) -> BudgetSplit:
    """Split `budget_bytes` between the layer groups by what one sequence needs of each.

    A `max_model_len`-token sequence computed in chunks of up to `max_num_batched_tokens`
    holds `max_blocks_held` blocks of each group at its peak (a window group only its window,
    sinks and the largest chunk); the budget is cut in that proportion, so a window group never
    hoards memory its sequences cannot use. KVMemoryError if it cannot hold one sequence.
    """
    per_seq = tuple(s.max_blocks_held(max_model_len, max_num_batched_tokens) for s in specs)
    seq_bytes = sum(n * s.page_nbytes for n, s in zip(per_seq, specs, strict=True))
    num_seqs = budget_bytes / seq_bytes
    if num_seqs < 1:
        groups = "; ".join(
            f"group {g}: {n:,} blocks of {s.page_nbytes:,} bytes"
            for g, (n, s) in enumerate(zip(per_seq, specs, strict=True))
        )
        raise KVMemoryError(
            f"kv_cache_memory {budget_bytes:,} bytes cannot hold one {max_model_len}-token "
            f"sequence, which needs {seq_bytes:,} bytes of KV ({groups}): raise "
            "kv_cache_memory or lower max_model_len"
        )
    num_blocks = tuple(int(n * num_seqs) + 1 for n in per_seq)
    return BudgetSplit(budget_bytes, per_seq, seq_bytes, num_seqs, num_blocks)
