"""Attention over the paged cache: write this step's K/V, then read the history in place.

With a cache and a paged kernel (`ctx.paged_attention`: the C++ one on the CPU, Triton's on
CUDA) every step shape (decode rows, prefill chunks, mixed batches) reads K/V through the
block tables. The torch reference (gather every key's rows + SDPA under a mask) serves the
no-cache baseline, KVLM_KERNELS=torch and devices without a paged kernel; tests hold the
kernels to it. Rope is applied here because the cache decides positions (places in the cache
under attention sinks, where the kernel ropes the keys itself). GQA/MQA heads are expanded
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
    if not view.rope_in_cache:  # rope by place in the text, keys stored rotated
        cos, sin = ctx.rope_tables(rope, ctx.positions)
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
            rope if view.rope_in_cache else None,
        )  # [T, nh, hd]
        return out.reshape(num_tokens, num_heads * head_dim)
    if view.store is not None:
        view.store.write(layer_idx, view.write_rows, k, v)
        keys, values = view.store.gather(layer_idx, view.gather_index)  # [B * S, nkv, hd]
    else:
        keys, values = k.index_select(0, view.gather_index), v.index_select(0, view.gather_index)
    if view.rope_in_cache:  # rope by place in the cache, keys stored unrotated
        keys = apply_rope(keys, *ctx.rope_tables(rope, view.key_positions))
        q = apply_rope(q, *ctx.rope_tables(rope, view.query_positions))
    shape = (ctx.num_seqs, view.num_keys, *keys.shape[1:])
    keys = keys.view(shape).transpose(1, 2)  # [B, nkv, S, hd]
    values = values.view(shape).transpose(1, 2)  # [B, nkv, S, hd]
    queries = _pad_queries(q, ctx).transpose(1, 2)  # [B, nh, Q, hd]
    if softcap is None:
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=view.mask, scale=scale, enable_gqa=True
        )
    else:
        out = _softcapped_attention(queries, keys, values, view.mask, scale, softcap)
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


def _softcapped_attention(
    q: torch.Tensor,  # [B, nh, Q, hd]
    k: torch.Tensor,  # [B, nkv, S, hd]
    v: torch.Tensor,  # [B, nkv, S, hd]
    mask: torch.Tensor | None,  # [B, 1, Q, S]
    scale: float,
    softcap: float,
) -> torch.Tensor:  # [B, nh, Q, hd]
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap  # [B, nh, Q, S]
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
