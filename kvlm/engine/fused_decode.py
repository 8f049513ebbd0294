"""The decoder stack of a step as one C++ call (kvlm.DecodePlan), for quantized weights.

A decode step (one new token per sequence) or a verification of a few draft tokens spends most
of its time outside the matmuls when each layer is ~30 torch ops: norms, rope, cache writes and
attention. `FusedDecoder` hands the whole stack to the C++ plan built once from the model's
weights; it writes the cache rows the runner computed and reads K/V through the block tables
(the same `GroupView`s the torch path uses) with the paged attention kernels, in every KV
format, with windows and sinks, so the two paths share every scheduling and caching decision.
Steps with several tokens per sequence (speculative verification, a prompt chunk beside decode
rows, a prompt) go through it too: the plan writes every new token's K/V before attention and
each token reads its sequence's keys up to its own, choosing the decode or the GEMM-shaped
prefill kernel by the longest chunk as `kvlm.kernels.paged.StepKernel` does. Rope goes by each
token's place in the text (`ctx.positions`), key counts by its place in each group's cache
(the views' `num_cached`, one per group): they differ for a request a KV press compacted, in
the groups it compacted (engine/press.py: the full-attention ones, not Gemma 3's local layers).

It applies where the C++ kernels run with AVX2 or better and every projection is quantized;
any other step (no-cache, a press's observation window) runs layer by layer, where attention
reads the same block tables (the runner's persistent batch state) with the same paged kernel.
The choice is the runner's (`ModelRunner.use_fused_decode`, then `accepts` step by step): the
model only runs the stack it is handed, and `kvlm.models` never imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvlm.kernels.build import ISA_CODES, SIMD_PATHS, KernelUnavailableError, resolve_path
from kvlm.kernels.paged import FORMAT_CODES, PREFILL_MIN_QUERY_LEN
from kvlm.kernels.tensor import QuantizedTensor

if TYPE_CHECKING:
    from kvlm.attention.context import ForwardContext
    from kvlm.models.layers import Linear
    from kvlm.models.transformer import CausalLM

_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
_NO_SCALES = torch.empty(0, dtype=torch.float16)  # what a float store passes for its scales


def _parts(linear: Linear) -> tuple[list[torch.Tensor], list[int]]:
    """Packed tensors of a quantized Linear and 4 ints per part: bits, group, scale_bytes, n."""
    weight = linear.weight
    assert isinstance(weight, QuantizedTensor)
    meta = []
    for p in weight.parts:
        meta += [p.format.bits, p.format.group, p.format.scale_bytes, p.out_features]
    return [p.packed for p in weight.parts], meta


def _norm(norm: torch.nn.Module | None) -> torch.Tensor:
    return torch.empty(0) if norm is None else norm.weight.detach()


def why_not_fused(model: CausalLM, path: str | None = None) -> str | None:
    """None when `FusedDecoder` can run this model; else the reason, in words."""
    config = model.config
    linears = [lin for layer in model.layers for lin in (
        layer.attn.qkv, layer.attn.out, layer.mlp.gate_up, layer.mlp.down)]  # fmt: skip
    if not all(lin.quantized for lin in linears):
        return "float weights"
    try:
        kernel_path = resolve_path(path)
    except KernelUnavailableError as e:
        return str(e)
    if kernel_path not in SIMD_PATHS:
        return f"the {kernel_path} kernel path (fused decode needs AVX2 kernels)"
    if model.layers[0].attn_norm.weight.device.type != "cpu":
        return "weights not on the CPU"
    if config.head_dim % 8:
        return f"head_dim {config.head_dim} is not a multiple of 8"
    return None


class FusedDecoder:
    def __init__(self, model: CausalLM, path: str | None = None) -> None:
        reason = why_not_fused(model, path)
        if reason is not None:
            raise ValueError(f"fused decode cannot run this model: {reason}")
        config = model.config
        rope_keys = list(model.ropes)
        self.plan = torch.classes.kvlm.DecodePlan(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.intermediate_size,
            config.rms_norm_eps,
            config.attn_scale,
            config.attn_logit_softcapping or 0.0,
            _ACTIVATIONS[config.hidden_act],
            model.norm.weight.detach(),
            ISA_CODES[resolve_path(path)],
        )
        for key in rope_keys:
            self.plan.add_rope(model.ropes[key].inv_freq)
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            self.plan.add_layer(
                _norm(layer.attn_norm),
                _norm(attn.q_norm),
                _norm(attn.k_norm),
                _norm(layer.post_attn_norm),
                _norm(layer.ffn_norm),
                _norm(layer.post_ffn_norm),
                *_parts(attn.qkv),
                *_parts(attn.out),
                *_parts(mlp.gate_up),
                *_parts(mlp.down),
                rope_keys.index(layer.rope_key),
            )
        self._layout: tuple[int, ...] | None = None  # ids of the stores the layout was set for

    def accepts(self, ctx: ForwardContext) -> bool:
        """A step whose every layer reads a paged cache."""
        return all(v.store is not None and v.block_table is not None for v in ctx.layer_views)

    def __call__(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x [T, H] embedded tokens -> final-normed hidden states [T, H]."""
        views = list({id(v): v for v in ctx.layer_views}.values())  # one per cache group
        stores = [v.store for v in views]
        self._set_layout(ctx, views)
        return self.plan.forward(
            x,
            ctx.positions,  # [T] rope by place in the text
            views[0].query_start,  # [B + 1] first row of each sequence (the same per group)
            [v.num_cached for v in views],  # [B] keys cached before each first new token
            [s.data for s in stores],
            [_NO_SCALES if s.scales is None else s.scales for s in stores],
            [v.write_rows for v in views],  # [T]
            [v.block_table for v in views],  # [B, max_blocks]
            ctx.max_query_len > PREFILL_MIN_QUERY_LEN,
        )

    def _set_layout(self, ctx: ForwardContext, views: list) -> None:
        key = tuple(id(v.store) for v in views)
        if key == self._layout:
            return
        position = {id(v): g for g, v in enumerate(views)}
        groups, k_offs, v_offs = [], [], []
        for layer_idx, view in enumerate(ctx.layer_views):
            k_off, v_off = view.store.layer_offsets(layer_idx)
            groups.append(position[id(view)])
            k_offs.append(k_off)
            v_offs.append(v_off)
        self.plan.set_layout(groups, k_offs, v_offs)
        specs = [v.store.spec for v in views]
        self.plan.set_groups(
            [FORMAT_CODES[spec.kv_format] for spec in specs],
            [spec.block_size for spec in specs],
            [v.store.rows_per_block for v in views],
            [spec.window or 0 for spec in specs],
            [spec.num_sinks for spec in specs],
        )
        self._layout = key
