"""One decoder-only transformer for Llama and Gemma 3; their differences are ModelConfig values.

The model knows nothing about paging: each attention layer calls `attention()` with q, k, v and
the step's ForwardContext. Notation: T tokens in the step, H hidden, nh/nkv heads, hd head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kvlm.attention.backend import attention
from kvlm.attention.context import ForwardContext
from kvlm.attention.rope import RotaryEmbedding
from kvlm.config import ModelConfig
from kvlm.loading.weights import LoadedModel
from kvlm.models.layers import Linear, RMSNorm, activation


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, lm: LoadedModel) -> None:
        super().__init__()
        p = f"blk.{layer_idx}."
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.attn_scale
        self.softcap = config.attn_logit_softcapping
        self.qkv = Linear.fused(
            lm.take(p + "attn_q.weight"), lm.take(p + "attn_k.weight"), lm.take(p + "attn_v.weight")
        )
        self.out = Linear(lm.take(p + "attn_output.weight"))
        self.q_norm = self.k_norm = None
        if config.use_qk_norm:
            self.q_norm = RMSNorm(lm.take(p + "attn_q_norm.weight"), config.rms_norm_eps)
            self.k_norm = RMSNorm(lm.take(p + "attn_k_norm.weight"), config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv.split(x)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, nh, hd]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, nkv, hd]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, nkv, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = attention(q, k, v, self.layer_idx, rope, self.scale, self.softcap, ctx)
        return self.out(o)  # [T, H]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, lm: LoadedModel) -> None:
        super().__init__()
        p = f"blk.{layer_idx}."
        self.gate_up = Linear.fused(lm.take(p + "ffn_gate.weight"), lm.take(p + "ffn_up.weight"))
        self.down = Linear(lm.take(p + "ffn_down.weight"))
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up.split(x)  # [T, intermediate] each
        return self.down(self.act(gate) * up)  # [T, H]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, lm: LoadedModel) -> None:
        super().__init__()
        p, eps = f"blk.{layer_idx}.", config.rms_norm_eps
        self.rope_key = (config.layer_rope_theta(layer_idx), config.layer_rope_scale(layer_idx))
        self.attn_norm = RMSNorm(lm.take(p + "attn_norm.weight"), eps)
        self.attn = Attention(config, layer_idx, lm)
        self.ffn_norm = RMSNorm(lm.take(p + "ffn_norm.weight"), eps)
        self.mlp = MLP(config, layer_idx, lm)
        self.post_attn_norm = self.post_ffn_norm = None
        if config.use_sandwich_norm:
            self.post_attn_norm = RMSNorm(lm.take(p + "post_attention_norm.weight"), eps)
            self.post_ffn_norm = RMSNorm(lm.take(p + "post_ffw_norm.weight"), eps)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, ctx: ForwardContext) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), rope, ctx)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h


# Embedded tokens [T, H] and the step's context -> final-normed hidden states [T, H].
DecoderStack = Callable[[torch.Tensor, ForwardContext], torch.Tensor]


class CausalLM(nn.Module):
    """Embeddings -> decoder layers -> final norm; `logits` projects chosen rows to the vocab."""

    def __init__(self, lm: LoadedModel) -> None:
        super().__init__()
        config = self.config = lm.config
        self.embed = nn.Embedding.from_pretrained(lm.take("token_embd.weight"), freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(config, i, lm) for i in range(config.num_layers))
        self.norm = RMSNorm(lm.take("output_norm.weight"), config.rms_norm_eps)
        self.lm_head = Linear(
            self.embed.weight if config.tie_word_embeddings else lm.take("output.weight")
        )
        self.ropes = {
            key: RotaryEmbedding(config.head_dim, *key)
            for key in {layer.rope_key for layer in self.layers}
        }
        self.embed_scale = config.embedding_scale

    def forward(
        self, input_ids: torch.Tensor, ctx: ForwardContext, decoder: DecoderStack | None = None
    ) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, H].

        `decoder`, when given, runs the whole stack (every layer and the final norm) in place of
        the layers here, from the same embeddings and context: the runner hands its fused decode
        step in this way, so the model never chooses a path and never imports one."""
        x = self.embed(input_ids)
        if self.embed_scale != 1.0:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if decoder is not None:
            return decoder(x, ctx)
        for layer in self.layers:
            x = layer(x, self.ropes[layer.rope_key], ctx)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> float32 logits [B, vocab]."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def to_device(self, device: torch.device) -> CausalLM:
        self.to(device)
        for rope in self.ropes.values():
            rope.to(device)
        return self
