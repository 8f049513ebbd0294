"""Paged attention in C++ that reads K/V through the block table from the store in place.

One call serves decode rows, prefill chunks and mixed batches of one layer. Notation: B
sequences, T new tokens of all of them concatenated (sequence b's are rows
query_start[b] .. query_start[b + 1] - 1), nh / nkv query / KV heads, hd head dim.

Invariants the caller keeps (and `paged_attention` checks, refusing with a ValueError):
- this step's K/V are already written to the store (`KVStore.write`), as the torch path does;
- sequence b has num_cached[b] tokens before the step, so its new tokens sit at text positions
  num_cached[b] .. num_cached[b] + count - 1 and it ends at end_b = num_cached[b] + count tokens;
  its block table row holds every block it reads: ceil(end_b / block_size) <= max_blocks;
- block ids lie in [0, num_blocks); blocks a window released are the null block (id 0) and are
  never read: a query at p reads keys kp <= p with kp > p - window or kp < num_sinks only;
- the stored keys and q are roped by their places in the text, in every group; a group with
  sinks also passes `sink_q`, q roped by its place in the cache, which the sink keys score
  against (rope is relative, so every other key's score is q.k as stored; see
  csrc/paged_attention.h), matching kvlm/attention/backend.py. No key is roped in the kernel.
The answer equals the torch reference (gather + SDPA, kvlm/attention/backend.py) up to float32
rounding in every format: both dequantize the same stored bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvlm.kernels.build import ISA_CODES, KernelUnavailableError, _build, resolve_path

FORMAT_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 3, "int4": 4, "fp8": 5}
# Steps whose longest chunk has more queries take the GEMM-shaped prefill kernel
# (csrc/paged_prefill.h: query tiles of 64 tokens, each key tile dequantized once per tile).
PREFILL_MIN_QUERY_LEN = 128


class PagedStore(Protocol):
    """What the kernel reads of a `kvlm.kv.store.KVStore` (kernels sit below kv: no import)."""

    spec: Any  # KVCacheSpec: head_dim, num_kv_heads, block_size, kv_format, window, num_sinks
    num_blocks: int
    rows_per_block: int
    data: torch.Tensor  # [num_blocks * rows_per_block, nkv, row_elements]
    scales: torch.Tensor | None  # [rows, nkv, num_scales] float16

    def layer_offsets(self, layer_idx: int) -> tuple[int, int]: ...


def _ops():
    failure = _build()
    if failure is not None:
        raise KernelUnavailableError(f"paged attention needs the C++ kernels: {failure}")
    return torch.ops.kvlm


def _isa(path: str | None) -> int:
    resolved = resolve_path(path)
    if resolved == "torch":
        raise KernelUnavailableError(
            "paged attention runs in the C++ kernels (ref, avx2 or avx512), not on the torch "
            "path; unset KVLM_KERNELS or name a C++ path"
        )
    return ISA_CODES[resolved]


def _int64(x: torch.Tensor, name: str, dims: int) -> torch.Tensor:
    if x.dtype not in (torch.int32, torch.int64) or x.dim() != dims or x.device.type != "cpu":
        raise ValueError(
            f"{name} must be a {dims}-D int32 or int64 CPU tensor, got {x.dtype} "
            f"{tuple(x.shape)} on {x.device}"
        )
    return x.to(torch.int64).contiguous()


def check_heads(q: torch.Tensor, spec: Any) -> None:
    """q [T, nh, hd] fits the store's heads (a whole number of query heads per KV head)."""
    _, num_heads, head_dim = q.shape
    if head_dim != spec.head_dim or num_heads % spec.num_kv_heads:
        raise ValueError(
            f"q has {num_heads} heads of {head_dim}; the store holds "
            f"{spec.num_kv_heads} heads of {spec.head_dim}"
        )


def check_sink_query(q: torch.Tensor, sink_q: torch.Tensor | None, spec: Any) -> None:
    """A group with sinks takes sink_q shaped as q (one without sinks none)."""
    if not spec.num_sinks:
        if sink_q is not None:
            raise ValueError("sink_q is for a group with attention sinks; this one has none")
        return
    if sink_q is None:
        raise ValueError(
            "a group with attention sinks needs `sink_q`: q roped by its place in the cache, "
            "which the sink keys score against"
        )
    if sink_q.shape != q.shape or sink_q.dtype != q.dtype or sink_q.device != q.device:
        raise ValueError(
            f"sink_q must be shaped as q {tuple(q.shape)} {q.dtype} on {q.device}, got "
            f"{tuple(sink_q.shape)} {sink_q.dtype} on {sink_q.device}"
        )


def check_lengths(table: torch.Tensor, starts: torch.Tensor, cached: torch.Tensor) -> None:
    """A block table row, a query start and a cached count per sequence (plus the end)."""
    num_seqs = table.shape[0]
    if len(starts) != num_seqs + 1 or len(cached) != num_seqs:
        raise ValueError(
            f"{num_seqs} block table rows need query_start [{num_seqs + 1}] and "
            f"num_cached [{num_seqs}]; got {len(starts)} and {len(cached)}"
        )


def check_values(
    table: torch.Tensor,  # [B, max_blocks] on the host
    starts: torch.Tensor,  # [B + 1]
    cached: torch.Tensor,  # [B]
    num_tokens: int,
    block_size: int,
    num_blocks: int,
) -> None:
    """The index values' invariants of the module docstring (host tensors: reading them is a
    sync on a device)."""
    counts = starts.diff()
    if starts[0] != 0 or starts[-1] != num_tokens or bool((counts < 0).any()):
        raise ValueError(f"query_start must rise from 0 to T={num_tokens}: {starts.tolist()}")
    if bool((cached < 0).any()):
        raise ValueError(f"num_cached must be >= 0: {cached.tolist()}")
    ends = cached + counts
    capacity = table.shape[1] * block_size
    if bool((ends > capacity).any()):
        raise ValueError(
            f"sequences end at {ends.tolist()} tokens, past {table.shape[1]} blocks of "
            f"{block_size} = {capacity} in the block table"
        )
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_blocks):
        raise ValueError(
            f"block ids {int(table.min())} .. {int(table.max())} are outside the "
            f"store's [0, {num_blocks})"
        )


@dataclass(frozen=True)
class _GroupIndex:
    """One cache group's index inputs of a step, checked (`check_lengths`, `check_values`)."""

    table: torch.Tensor  # [B, max_blocks] int64
    starts: torch.Tensor  # [B + 1] int64
    cached: torch.Tensor  # [B] int64
    max_query_len: int  # the longest chunk's new tokens (0 without sequences)
    # The caller's tensors, kept alive so that their ids are not reused during the step
    sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class StepKernel:
    """The C++ paged kernel for the layers of one step (the `PagedKernel` call): each cache
    group's index inputs are converted and checked once, on the first layer that reads them;
    later layers check only q (and sink_q).

    Build one per step (`ModelRunner.prepare` does): it holds the step's index tensors, so
    none is freed and its id reused while it lives, and a new step never sees stale checks.
    The index tensors must not change during the step (the runner writes them before it)."""

    def __init__(self, path: str | None = None) -> None:
        self.isa = _isa(path)
        # id(block_table), id(query_start), id(num_cached) -> those inputs, checked
        self._groups: dict[tuple[int, int, int], _GroupIndex] = {}

    def __call__(
        self,
        q: torch.Tensor,  # [T, nh, hd] float32
        store: PagedStore,
        layer_idx: int,
        block_table: torch.Tensor,  # [B, max_blocks] int32/int64
        query_start: torch.Tensor,  # [B + 1] first row of each sequence in T, then T
        num_cached: torch.Tensor,  # [B] tokens cached before the step
        scale: float,
        softcap: float | None = None,
        sink_q: torch.Tensor | None = None,  # [T, nh, hd] q roped by place in the cache (sinks)
        prefill: bool | None = None,  # the prefill kernel; None: if a chunk has over
        # PREFILL_MIN_QUERY_LEN queries
    ) -> torch.Tensor:  # [T, nh, hd] float32
        spec = store.spec
        if q.dtype != torch.float32 or q.dim() != 3 or q.device.type != "cpu":
            raise ValueError(
                f"q must be float32 [T, nh, hd] on the CPU, got {q.dtype} "
                f"{tuple(q.shape)} on {q.device}"
            )
        check_heads(q, spec)
        index = self.check_indices(q.shape[0], store, block_table, query_start, num_cached)
        if prefill is None:
            prefill = index.max_query_len > PREFILL_MIN_QUERY_LEN
        check_sink_query(q, sink_q, spec)
        k_off, v_off = store.layer_offsets(layer_idx)
        return _ops().paged_attention(
            q.contiguous(),
            store.data,
            store.scales,
            k_off,
            v_off,
            spec.block_size,
            store.rows_per_block,
            index.table,
            index.starts,
            index.cached,
            spec.window or 0,
            spec.num_sinks,
            scale,
            softcap or 0.0,
            FORMAT_CODES[spec.kv_format],
            sink_q.contiguous() if spec.num_sinks else None,
            self.isa,
            prefill,
        )

    def check_indices(
        self,
        num_tokens: int,
        store: PagedStore,
        block_table: torch.Tensor,
        query_start: torch.Tensor,
        num_cached: torch.Tensor,
    ) -> _GroupIndex:
        """A group's index inputs as int64, checked on the first call of the step (each
        layer's call repeats only an O(1) check of T)."""
        key = (id(block_table), id(query_start), id(num_cached))
        index = self._groups.get(key)
        if index is None:
            table = _int64(block_table, "block_table", 2)
            starts = _int64(query_start, "query_start", 1)
            cached = _int64(num_cached, "num_cached", 1)
            check_lengths(table, starts, cached)
            spec = store.spec
            check_values(table, starts, cached, num_tokens, spec.block_size, store.num_blocks)
            max_query_len = int(starts.diff().max()) if len(cached) else 0
            sources = (block_table, query_start, num_cached)
            index = _GroupIndex(table, starts, cached, max_query_len, sources)
            self._groups[key] = index
        elif int(index.starts[-1]) != num_tokens:
            raise ValueError(
                f"query_start must rise from 0 to T={num_tokens}: {index.starts.tolist()}"
            )
        return index


def paged_attention(
    q: torch.Tensor,  # [T, nh, hd] float32
    store: PagedStore,
    layer_idx: int,
    block_table: torch.Tensor,  # [B, max_blocks] int32/int64
    query_start: torch.Tensor,  # [B + 1] first row of each sequence in T, then T
    num_cached: torch.Tensor,  # [B] tokens cached before the step
    scale: float,
    softcap: float | None = None,
    sink_q: torch.Tensor | None = None,  # [T, nh, hd] q roped by place in the cache (sinks)
    path: str | None = None,  # kernel path; None: the process default
    prefill: bool | None = None,  # the prefill kernel; None: if a chunk has over
    # PREFILL_MIN_QUERY_LEN queries
) -> torch.Tensor:  # [T, nh, hd] float32
    """One layer's call, every input checked (a step's layers share a `StepKernel` instead)."""
    step = StepKernel(path)
    return step(
        q, store, layer_idx, block_table, query_start, num_cached, scale, softcap, sink_q, prefill
    )


def quantize_kv(x: torch.Tensor, kv_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ quantizer the decode plan writes with: x [N, hd] float32 -> (storage
    [N, row_elements], float16 scales [N, num_scales]), as `KVFormat.quantize` (int8 and fp8
    bit for bit; int4 up to float rounding in its rotation)."""
    if kv_format not in ("int8", "int4", "fp8"):
        raise ValueError(f"quantize_kv quantizes int8, int4 or fp8, not {kv_format!r}")
    return _ops().quantize_kv(x, FORMAT_CODES[kv_format])
