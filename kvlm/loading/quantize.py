"""Quantize float matrices at load (`weight_format` "q8_0" / "q4_1") for kvlm's kernels.

The float weights go through gguf-py's reference quantizer (llama.cpp's rounding, so the result
is what `llama-quantize` would store), then the same exact repacking as a GGUF file's tensors.
"""

from __future__ import annotations

import gguf
import torch

from kvlm.kernels import QuantizedTensor, repack_gguf

Q = gguf.GGMLQuantizationType
LOAD_QUANTIZATIONS = {"q8_0": Q.Q8_0, "q4_1": Q.Q4_1}
# The matrices every projection and the embedding multiply by; norms and biases stay float.
MATRIX_SUFFIXES = (
    "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "token_embd.weight", "output.weight",
)  # fmt: skip


def quantize_matrix(weight: torch.Tensor, qtype: Q) -> QuantizedTensor:
    """A float [out, in] matrix (in a multiple of 32) as a QuantizedTensor of GGUF type qtype."""
    raw = gguf.quants.quantize(weight.float().numpy(), qtype)  # [out, bytes per row] uint8
    return QuantizedTensor.from_plain(repack_gguf(raw, qtype, tuple(weight.shape)))


def quantize_float_matrices(weights: dict[str, torch.Tensor], weight_format: str) -> None:
    """In place: every float projection/embedding matrix whose rows are whole 32-blocks."""
    qtype = LOAD_QUANTIZATIONS[weight_format]
    for name, w in weights.items():
        if (
            name.endswith(MATRIX_SUFFIXES)
            and not isinstance(w, QuantizedTensor)
            and w.dim() == 2
            and w.shape[1] % 32 == 0
        ):
            weights[name] = quantize_matrix(w, qtype)
