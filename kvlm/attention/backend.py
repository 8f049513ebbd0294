"""Paged attention on torch SDPA: write this step's K/V to the pool, read history by slot.

The same function serves prefill, decode, mixed batches and the no-cache baseline; only the
ForwardContext differs. GQA/MQA heads are expanded inside SDPA (`enable_gqa`), never in the pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlm.attention.context import ForwardContext


def attention(
    q: torch.Tensor,  # [T, nh, hd]
    k: torch.Tensor,  # [T, nkv, hd]
    v: torch.Tensor,  # [T, nkv, hd]
    layer_idx: int,
    window: int | None,
    scale: float,
    softcap: float | None,
    ctx: ForwardContext,
) -> torch.Tensor:  # [T, nh * hd]
    if ctx.kv_pool is not None:
        ctx.kv_pool.write(layer_idx, ctx.slot_mapping, k, v)
        k_src, v_src = ctx.kv_pool.layer(layer_idx)  # [num_slots, nkv, hd]
    else:
        k_src, v_src = k, v
    view = ctx.views[window]
    keys = _gather(k_src, view.gather_index)  # [B, nkv, S, hd]
    values = _gather(v_src, view.gather_index)  # [B, nkv, S, hd]
    queries = _pad_queries(q, ctx).transpose(1, 2)  # [B, nh, Q, hd]
    if softcap is None:
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=view.mask, scale=scale, enable_gqa=True
        )
    else:
        out = _softcapped_attention(queries, keys, values, view.mask, scale, softcap)
    out = out.transpose(1, 2)  # [B, Q, nh, hd]
    num_tokens, num_heads, head_dim = q.shape
    if ctx.query_pad_index is None:
        return out.reshape(num_tokens, num_heads * head_dim)
    flat = out.reshape(-1, num_heads * head_dim)  # [B * Q, nh * hd]
    return flat.index_select(0, ctx.query_pad_index)


def _gather(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of `source` [N, nkv, hd] at `index` [B, S] -> [B, nkv, S, hd]."""
    rows = source.index_select(0, index.view(-1))  # [B * S, nkv, hd]
    return rows.view(*index.shape, *source.shape[1:]).transpose(1, 2)


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
