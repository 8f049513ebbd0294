"""Paged attention in Triton: the GPU twin of kvlm/kernels/paged.py, same store, same answer.

`paged_attention` takes what the C++ entry takes (minus `path`) and keeps its invariants (see
kvlm/kernels/paged.py): K/V are read through the block table from the block-major store in
place, in every KV format, for decode rows, prefill chunks and mixed batches in one launch.
Tensors live on CUDA, or on the CPU when triton runs its interpreter (TRITON_INTERPRET=1 set
before this module is imported), which is how CI tests it.

One program per (query tile, KV head). A tile is up to `QUERIES` consecutive queries of one
sequence times the KV head's G query heads (GQA/MQA: each K/V tile is read once for all of
them), BLOCK_M rows in all. Tiles are numbered without reading anything on the host: sequence b
owns tiles query_start[b] // QUERIES + b .. query_start[b + 1] // QUERIES + b (a binary search in
the kernel finds b), so the grid depends only on T and B and a launch needs no host sync.
Keys are visited in tiles of BLOCK_N places, each key's row looked up in the block table, with
online softmax; int8/fp8/int4 are dequantized in registers (fp8 and bfloat16 decoded from their
bits, int4 from its nibbles). int4's Hadamard rotation is applied to q and the output. Keys are
stored roped by their text positions and q comes roped by its own; with sinks the sink keys
score against `sink_q` instead, q roped by its place in the cache (csrc/paged_attention.h), so
no key is roped here.

Index tensors (block_table, query_start, num_cached) on the CPU are checked as the C++ entry
checks them and copied over; on the device they are taken as they are (the runner's persistent
batch state keeps them valid, and checking would cost a host sync per layer).
"""

from __future__ import annotations

import torch

from kvlm.kernels.build import KernelUnavailableError
from kvlm.kernels.paged import (
    FORMAT_CODES,
    PagedStore,
    check_heads,
    check_lengths,
    check_sink_query,
    check_values,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # `paged_attention` says so when called
    triton = tl = None

_Q_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


def interpreted() -> bool:
    """Whether the kernels run in triton's CPU interpreter: TRITON_INTERPRET=1 was set when
    triton was first imported (triton.language defines its own @jit functions then) and when
    this module was."""
    jitted = (_paged_attention_kernel, tl.sum) if triton is not None else ()
    return triton is not None and not any(isinstance(f, triton.JITFunction) for f in jitted)


@_jit
def _find_sequence(starts_ptr, num_seqs, tile, QUERIES: tl.constexpr):
    """The last sequence b whose first tile, query_start[b] // QUERIES + b, is <= tile."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(starts_ptr + mid).to(tl.int32) // QUERIES + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@_jit
def _hadamard(x, d, n_log2: tl.constexpr, norm: tl.constexpr):
    """x @ H along the last axis, H the orthonormal Sylvester Hadamard matrix of width
    2 ** n_log2 block by block (a butterfly per bit: pairs (j, j + L) -> (u + w, u - w)); norm is
    its 1 / sqrt(width)."""
    for i in tl.static_range(n_log2):
        bit = 1 << i
        partner = tl.gather(x, tl.broadcast_to(d ^ bit, x.shape), 1)
        x = tl.where((d & bit) != 0, partner - x, x + partner)
    return x * norm


@_jit
def _load_heads(
    data_ptr,
    scales_ptr,
    rows,
    kvh,
    d,
    ok,
    data_row,
    data_head,
    scale_row,
    scale_head,
    FORMAT: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
):
    """KV head kvh of the store rows `rows` [N, 1], dequantized to float32 [N, BLOCK_D]
    (strides in elements); elements where not `ok` are 0 and never read. FORMAT: FORMAT_CODES."""
    at = rows * data_row + kvh * data_head
    if FORMAT == 4:  # int4: nibble d % 2 of byte d // 2, offset by 8
        byte = tl.load(data_ptr + at + d // 2, mask=ok, other=0).to(tl.int32)
        x = (((byte >> ((d & 1) * 4)) & 0xF) - 8).to(tl.float32)
    elif FORMAT == 5:  # fp8 e4m3fn from its bits: (8 + m) 2^(e - 10), or m 2^-9 when e == 0
        bits = tl.load(data_ptr + at + d, mask=ok, other=0).to(tl.int32)
        e = (bits >> 3) & 0xF
        m = (bits & 0x7).to(tl.float32)
        power = ((e + 117) << 23).to(tl.float32, bitcast=True)  # 2^(e - 10)
        x = tl.where(e == 0, m * 0.001953125, (m + 8.0) * power)
        x = tl.where((bits & 0x80) != 0, -x, x)
    elif FORMAT == 2:  # bfloat16 from its bits (stored viewed as int16)
        bits = tl.load(data_ptr + at + d, mask=ok, other=0).to(tl.int32)
        x = ((bits & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:  # float32, float16, int8
        x = tl.load(data_ptr + at + d, mask=ok, other=0).to(tl.float32)
    if FORMAT >= 3:
        s = tl.load(
            scales_ptr + rows * scale_row + kvh * scale_head + d // SCALE_GROUP, mask=ok, other=0
        )
        x = x * s.to(tl.float32)
    return x


@_jit
def _dot(a, b, dot_dtype: tl.constexpr):
    """a @ b accumulated in float32: float32 products for float32 q (IEEE, not TF32, as the
    C++ kernel and the reference), else in q's 16-bit type on the tensor cores."""
    if dot_dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(dot_dtype), b.to(dot_dtype))


@_jit
def _paged_attention_kernel(
    out_ptr, q_ptr, sink_q_ptr, data_ptr, scales_ptr, table_ptr, starts_ptr, cached_ptr,
    num_seqs, q_token, q_head, sink_q_token, sink_q_head, out_token, out_head, data_row,
    data_head, scale_row, scale_head,
    table_stride, k_off, v_off, rows_per_block, window, num_sinks, scale, softcap,
    GROUP: tl.constexpr, QUERIES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FORMAT: tl.constexpr, SCALE_GROUP: tl.constexpr, ROTATION_LOG2: tl.constexpr,
    ROTATION_NORM: tl.constexpr, HAS_WINDOW: tl.constexpr, SINKS: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = _find_sequence(starts_ptr, num_seqs, tile, QUERIES)
    first = tl.load(starts_ptr + b).to(tl.int32)
    end = tl.load(starts_ptr + b + 1).to(tl.int32)
    t0 = first + (tile - (first // QUERIES + b)) * QUERIES
    if t0 >= end:  # a sequence's spare tile
        return
    cached = tl.load(cached_ptr + b).to(tl.int32)
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // GROUP  # [M] rows of T
    head = kvh * GROUP + r % GROUP
    row_ok = (r < QUERIES * GROUP) & (t < end)
    pos = cached + tl.where(row_ok, t, t0) - first  # text positions (spare rows: the first's)
    d = tl.arange(0, BLOCK_D)[None, :]
    q_ok = row_ok[:, None] & (d < HEAD_DIM)
    q_at = t.to(tl.int64)[:, None] * q_token + head[:, None] * q_head + d
    q = tl.load(q_ptr + q_at, mask=q_ok, other=0.0).to(tl.float32)
    if ROTATION_LOG2:  # int4 keys are stored times H: q.(k H) = (q H).k
        q = _hadamard(q, d, ROTATION_LOG2, ROTATION_NORM)
    q = (q * scale).to(DOT_DTYPE)
    p_first = cached + t0 - first
    p_last = cached + tl.minimum(t0 + QUERIES, end) - 1 - first
    lo = 0  # keys lo .. p_last, after num_before sinks 0 .. num_before - 1
    num_before = 0
    ns = 0
    sq = q  # unread without sinks
    if HAS_WINDOW:
        lo = tl.maximum(p_first - window + 1, 0)
    if SINKS:  # keys 0 .. ns - 1 are sinks by place: they score against sink_q (ns <= num_before)
        num_before = tl.minimum(num_sinks, lo)
        ns = tl.minimum(num_sinks, tl.maximum(cached - window + 1, 0))
        sq_at = t.to(tl.int64)[:, None] * sink_q_token + head[:, None] * sink_q_head + d
        sq = tl.load(sink_q_ptr + sq_at, mask=q_ok, other=0.0).to(tl.float32)
        if ROTATION_LOG2:
            sq = _hadamard(sq, d, ROTATION_LOG2, ROTATION_NORM)
        sq = (sq * scale).to(DOT_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    table_row = table_ptr + b.to(tl.int64) * table_stride
    num_keys = num_before + p_last + 1 - lo
    # Online softmax over the keys, BLOCK_N at a time. Every key visited is seen by some row
    # of the tile, so none lies in a block a window released.
    for start in range(0, num_keys, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        kp = tl.where(j < num_before, j, lo + j - num_before)  # [N] key places in the text
        live = j < num_keys
        block = tl.load(table_row + kp // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        rows = (block * rows_per_block + kp % BLOCK_SIZE)[:, None]  # [N, 1] base rows
        ok = live[:, None] & (d < HEAD_DIM)
        k = _load_heads(data_ptr, scales_ptr, rows + k_off, kvh, d, ok, data_row, data_head,
                        scale_row, scale_head, FORMAT, SCALE_GROUP)  # fmt: skip
        s = _dot(q, tl.trans(k), DOT_DTYPE)  # [M, N] scores
        if SINKS:  # noqa: SIM102 (a constexpr test apart, so groups without sinks compile none)
            if start < ns:  # the tile holds sink keys: their scores are against sink_q
                s = tl.where(kp[None, :] < ns, _dot(sq, tl.trans(k), DOT_DTYPE), s)
        if SOFTCAP:  # tanh(s / c) c, tanh from exp (no tanh in every backend)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        seen = live[None, :] & (kp[None, :] <= pos[:, None])
        if HAS_WINDOW:
            seen = seen & ((kp[None, :] > pos[:, None] - window) | (kp[None, :] < num_sinks))
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_heads(data_ptr, scales_ptr, rows + v_off, kvh, d, ok, data_row, data_head,
                        scale_row, scale_head, FORMAT, SCALE_GROUP)  # fmt: skip
        acc = acc * alpha[:, None] + _dot(p, v, DOT_DTYPE)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if ROTATION_LOG2:  # values were summed as stored, times H
        out = _hadamard(out, d, ROTATION_LOG2, ROTATION_NORM)
    out_at = t.to(tl.int64)[:, None] * out_token + head[:, None] * out_head + d
    tl.store(out_ptr + out_at, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d < HEAD_DIM))  # fmt: skip


def _index(x: torch.Tensor, name: str, dims: int, device: torch.device) -> torch.Tensor:
    if x.dtype not in (torch.int32, torch.int64) or x.dim() != dims:
        raise ValueError(
            f"{name} must be a {dims}-D int32 or int64 tensor, got {x.dtype} {tuple(x.shape)}"
        )
    if x.device.type not in ("cpu", device.type):
        raise ValueError(f"{name} is on {x.device}; pass it on the CPU or on q's {device}")
    return x.contiguous()


def launch_options(spec, num_heads: int, q_dtype: torch.dtype, decode: bool) -> dict:
    """The kernel's constexprs and warps for a group's spec, q's heads and dtype, and whether
    the step is all decode rows (one query per sequence)."""
    group = num_heads // spec.num_kv_heads
    block_d = max(16, triton.next_power_of_2(spec.head_dim))
    # Decode rows fill a tile with one query's heads; chunks take more queries per tile. Sizes
    # and warps chosen so that sm_90 builds spill no registers (ptxas, checked without a GPU).
    wide = block_d > 128
    block_m = max(16 if decode or wide else 64, triton.next_power_of_2(group))
    rotation = spec.format.rotation_size or 0
    return {
        "GROUP": group,
        "QUERIES": block_m // group,
        "BLOCK_M": block_m,
        "BLOCK_N": 16 if wide else 32,
        "BLOCK_D": block_d,
        "HEAD_DIM": spec.head_dim,
        "BLOCK_SIZE": spec.block_size,
        "FORMAT": FORMAT_CODES[spec.kv_format],
        "SCALE_GROUP": spec.format.group_size,
        "ROTATION_LOG2": rotation.bit_length() - 1 if rotation else 0,
        "ROTATION_NORM": rotation**-0.5 if rotation else 1.0,
        "HAS_WINDOW": spec.window is not None,
        "SINKS": spec.num_sinks > 0,
        "DOT_DTYPE": tl.float32 if q_dtype == torch.float32 else getattr(tl, str(q_dtype)[6:]),
        "num_warps": 4 if block_m * block_d <= 16 * 64 else 8,
    }


def paged_attention(
    q: torch.Tensor,  # [T, nh, hd] float32, float16 or bfloat16
    store: PagedStore,
    layer_idx: int,
    block_table: torch.Tensor,  # [B, max_blocks] int32/int64
    query_start: torch.Tensor,  # [B + 1] first row of each sequence in T, then T
    num_cached: torch.Tensor,  # [B] tokens cached before the step
    scale: float,
    softcap: float | None = None,
    sink_q: torch.Tensor | None = None,  # [T, nh, hd] q roped by place in the cache (sinks)
) -> torch.Tensor:  # [T, nh, hd] in q's dtype
    if triton is None:
        raise KernelUnavailableError(
            "the Triton paged attention needs triton (CUDA builds of torch ship it; "
            "`pip install triton` elsewhere)"
        )
    spec = store.spec
    device = q.device
    if q.dtype not in _Q_DTYPES or q.dim() != 3:
        raise ValueError(
            f"q must be [T, nh, hd] float32, float16 or bfloat16, got {q.dtype} {tuple(q.shape)}"
        )
    if device.type == "cpu" and not interpreted():
        raise ValueError(
            "CPU tensors run only in triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    if store.data.device != device:
        raise ValueError(f"q is on {device} but the store on {store.data.device}")
    num_tokens, num_heads, _ = q.shape
    check_heads(q, spec)
    table = _index(block_table, "block_table", 2, device)
    starts = _index(query_start, "query_start", 1, device)
    cached = _index(num_cached, "num_cached", 1, device)
    num_seqs = table.shape[0]
    check_lengths(table, starts, cached)
    on_host = [x.device.type == "cpu" for x in (table, starts, cached)]
    if any(on_host):
        if not all(on_host):
            raise ValueError("block_table, query_start and num_cached must be on one device")
        check_values(table, starts, cached, num_tokens, spec.block_size, store.num_blocks)
        table, starts, cached = (x.to(device) for x in (table, starts, cached))
    check_sink_query(q, sink_q, spec)
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    options = launch_options(spec, num_heads, q.dtype, decode=num_tokens == num_seqs)
    sink_q = q if sink_q is None else sink_q  # unread without sinks
    data = store.data.view(torch.int16) if spec.kv_format == "bfloat16" else store.data
    scales = store.scales if store.scales is not None else data
    k_off, v_off = store.layer_offsets(layer_idx)
    grid = (num_tokens // options["QUERIES"] + num_seqs, spec.num_kv_heads)
    _paged_attention_kernel[grid](
        out,
        q,
        sink_q,
        data,
        scales,
        table,
        starts,
        cached,
        num_seqs,
        q.stride(0),
        q.stride(1),
        sink_q.stride(0),
        sink_q.stride(1),
        out.stride(0),
        out.stride(1),
        data.stride(0),
        data.stride(1),
        scales.stride(0),
        scales.stride(1),
        table.stride(0),
        k_off,
        v_off,
        store.rows_per_block,
        spec.window or 0,
        spec.num_sinks,
        scale,
        softcap or 0.0,
        SOFTCAP=bool(softcap),
        **options,
    )
    return out
