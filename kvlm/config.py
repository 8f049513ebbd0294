"""Model hyper-parameters, read from a GGUF header or a Hugging Face config.json.

One dataclass describes every architecture kvlm runs; the differences between Llama and Gemma 3
are values here (norm style, activation, rope bases, sliding windows), not forks of the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")


class ModelConfigError(ValueError):
    """A model file describes something kvlm cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    rms_norm_eps: float
    rope_theta: float
    # Gemma 3: local (sliding) layers use their own rope base; None means "same as rope_theta".
    rope_local_theta: float | None = None
    # Linear rope scaling applied to full-attention layers only (Gemma 3 1B+ use 8.0).
    rope_scaling_factor: float = 1.0
    # Per layer: None for full attention, else the window in tokens (a query at position p
    # sees keys at positions p - window + 1 .. p).
    sliding_windows: tuple[int | None, ...] = field(default_factory=tuple)
    hidden_act: str = "silu"  # "silu" | "gelu_tanh"
    # Attention scale is query_pre_attn_scalar ** -0.5 when set, else head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    embedding_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)
    use_qk_norm: bool = False
    use_sandwich_norm: bool = False  # Gemma: extra norms after attention and after the MLP
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {self.architecture!r}; kvlm runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelConfigError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ModelConfigError(f"unsupported activation {self.hidden_act!r}")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ModelConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries for "
                f"{self.num_layers} layers"
            )

    @property
    def attn_scale(self) -> float:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return float(scalar) ** -0.5

    def layer_rope_theta(self, layer_idx: int) -> float:
        if self.sliding_windows[layer_idx] is not None and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    def layer_rope_scale(self, layer_idx: int) -> float:
        return 1.0 if self.sliding_windows[layer_idx] is not None else self.rope_scaling_factor
