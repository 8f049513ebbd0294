"""Attention over the paged cache: write this step's K/V, then read the history in place.

With a cache and a paged kernel (`ctx.paged_attention`: the C++ one on the CPU, Triton's on
CUDA) every step shape (decode rows, prefill chunks, mixed batches) reads K/V through the
block tables. The torch reference (gather every key's rows + SDPA under a mask) serves the
no-cache baseline, KVLM_KERNELS=torch and devices without a paged kernel; tests hold the
kernels to it. Rope is applied here, by text position to q and to the keys the cache stores,
in every group. Under attention sinks the cache decides places: rope is relative, so a window
key is as far from a query in the cache as in the text, and only the sink keys need q roped by
its place in the cache (`sink_q`, from `GroupView.query_places`). GQA/MQA heads are expanded
inside the kernel or SDPA (`enable_gqa`), never in the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlm.attention.context import ForwardContext, PagedKernel
from kvlm.attention.rope import RotaryEmbedding, apply_rope
from kvlm.kernels import paged
from kvlm.kernels.build import kernel_status, resolve_path


def attention(
    q: torch.Tensor,  # [T, nh, hd], before rope
    k: torch.Tensor,  # [T, nkv, hd], before rope
    v: torch.Tensor,  # [T, nkv, hd]
    layer_idx: int,
    rope: RotaryEmbedding,
    scale: float,
    softcap: float | None,
    ctx: ForwardContext,
) -> torch.Tensor:  # [T, nh * hd]
    view = ctx.layer_views[layer_idx]
    num_tokens, num_heads, head_dim = q.shape
    if ctx.query_capture is not None:  # never with sinks: a press refuses them
        ctx.query_capture.add(layer_idx, q, rope, scale)  # it applies the rope it needs
    sink_q = None  # [T, nh, hd] with sinks: q at its place in the cache, for the sink keys
    if view.query_places is not None:
        sink_q = apply_rope(q, *ctx.rope_tables(rope, view.query_places))
    cos, sin = ctx.rope_tables(rope, ctx.positions)  # by text position, as the keys are stored
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if ctx.paged_attention is not None and view.store is not None:
        view.store.write(layer_idx, view.write_rows, k, v)
        out = ctx.paged_attention(
            q,
            view.store,
            layer_idx,
            view.block_table,
            view.query_start,
            view.num_cached,
            scale,
            softcap,
            sink_q,
        )  # [T, nh, hd]
        return out.reshape(num_tokens, num_heads * head_dim)
    if view.store is not None:
        view.store.write(layer_idx, view.write_rows, k, v)
        keys, values = view.store.gather(layer_idx, view.gather_index)  # [B * S, nkv, hd]
    else:
        keys, values = k.index_select(0, view.gather_index), v.index_select(0, view.gather_index)
    shape = (ctx.num_seqs, view.num_keys, *keys.shape[1:])
    keys = keys.view(shape).transpose(1, 2)  # [B, nkv, S, hd]
    values = values.view(shape).transpose(1, 2)  # [B, nkv, S, hd]
    queries = _pad_queries(q, ctx).transpose(1, 2)  # [B, nh, Q, hd]
    if softcap is None and sink_q is None:
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=view.mask, scale=scale, enable_gqa=True
        )
    else:
        sink_queries = None if sink_q is None else _pad_queries(sink_q, ctx).transpose(1, 2)
        sinks = None if sink_q is None else (sink_queries, view.sink_keys)
        out = _explicit_attention(queries, keys, values, view.mask, scale, softcap, sinks)
    out = out.transpose(1, 2)  # [B, Q, nh, hd]
    if ctx.query_pad_index is None:
        return out.reshape(num_tokens, num_heads * head_dim)
    flat = out.reshape(-1, num_heads * head_dim)  # [B * Q, nh * hd]
    return flat.index_select(0, ctx.query_pad_index)


def _pad_queries(q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """[T, nh, hd] -> [B, Q, nh, hd]; padded rows are zeros and their outputs are dropped."""
    if ctx.query_pad_index is None:
        return q.unsqueeze(1)
    padded = q.new_zeros(ctx.num_seqs * ctx.max_query_len, *q.shape[1:])
    padded.index_copy_(0, ctx.query_pad_index, q)
    return padded.view(ctx.num_seqs, ctx.max_query_len, *q.shape[1:])


def _explicit_attention(
    q: torch.Tensor,  # [B, nh, Q, hd]
    k: torch.Tensor,  # [B, nkv, S, hd]
    v: torch.Tensor,  # [B, nkv, S, hd]
    mask: torch.Tensor | None,  # [B, 1, Q, S]
    scale: float,
    softcap: float | None,
    # sinks: q roped by place [B, nh, Q, hd] and which keys are sinks by place [B, 1, 1, S]
    sinks: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:  # [B, nh, Q, hd]
    """Attention with its scores written out: softcapped, and under sinks
    scores = where(key is a sink, sink_q . k, q . k)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2)  # [B, nh, Q, S]
    if sinks is not None:
        sink_q, sink_keys = sinks
        scores = torch.where(sink_keys, sink_q @ k.transpose(-1, -2), scores)
    scores = scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


def paged_kernel_for(device: torch.device, dtype: torch.dtype) -> tuple[PagedKernel | None, str]:
    """The paged kernel attention runs on `device` with `dtype` activations, or None (the
    torch reference), and why, in words for the log."""
    if device.type == "cuda":
        from kvlm.kernels import triton_paged  # Triton ships with CUDA torch only

        return triton_paged.paged_attention, "Triton paged attention on CUDA"
    if device.type != "cpu":
        return None, f"no paged kernel for {device.type}: gather + SDPA (torch reference)"
    path = resolve_path(None)
    if path == "torch":
        return None, f"the torch kernel path ({kernel_status().reason}): gather + SDPA"
    if dtype != torch.float32:
        return None, f"the C++ paged kernel takes float32, the model computes in {dtype}"
    return paged.paged_attention, f"C++ paged attention ({path} path)"
