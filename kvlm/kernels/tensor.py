"""QuantizedTensor: a quantized [out, in] weight that can stand where a float tensor is expected.

It is a wrapper tensor subclass (float32 shape, no float storage), so the model code is the same
for every weight format: `nn.Embedding.from_pretrained` accepts it and an embedding lookup
dequantizes only the gathered rows, a tied lm_head hands the same object to `Linear`, and
`Linear` calls its `linear`. Any other tensor operation on it is an error that says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvlm.kernels.formats import TILE_ROWS, PackFormat, PlainQuant, QuantizedWeight
from kvlm.kernels.matmul import matmul

aten = torch.ops.aten


class QuantizedTensor(torch.Tensor):
    """Matrices stacked along out_features (`parts`, each packed for the kernels)."""

    parts: tuple[QuantizedWeight, ...]

    @staticmethod
    def __new__(cls, parts: Sequence[QuantizedWeight]) -> QuantizedTensor:
        in_features = {p.in_features for p in parts}
        assert len(in_features) == 1, f"stacked parts need one in_features, got {in_features}"
        shape = (sum(p.out_features for p in parts), parts[0].in_features)
        device = parts[0].packed.device
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device=device)
        t.parts = tuple(parts)
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        if func is aten.embedding.default:
            return args[0].dequantize_rows(args[1])
        if func in (aten.detach.default, aten.alias.default):
            return QuantizedTensor(args[0].parts)
        raise NotImplementedError(
            f"{func} is not supported on a quantized weight (only embedding lookups and "
            "kvlm's Linear read it); load the model with weight_format='float' instead"
        )

    def __repr__(self) -> str:  # type: ignore[override]
        formats = "+".join(p.format.name for p in self.parts)
        return f"QuantizedTensor({list(self.shape)}, {formats}, {self.nbytes_packed:,} bytes)"

    @property
    def nbytes_packed(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def linear(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """x [M, in] float32 -> x @ self.T, [M, out] float32 (see kernels.matmul)."""
        return matmul(x, self.parts, path)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])

    def dequantize_rows(self, row_ids: torch.Tensor) -> torch.Tensor:
        assert len(self.parts) == 1, "row lookups are for single matrices (embeddings)"
        return self.parts[0].dequantize_rows(row_ids)

    @classmethod
    def from_plain(cls, plain: PlainQuant) -> QuantizedTensor:
        return cls([QuantizedWeight.pack(plain)])

    @classmethod
    def stack(cls, tensors: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """Concatenate along out_features for a fused projection (q/k/v, gate/up).

        Neighbours in the same format whose rows fill whole 16-row tiles share one packed
        matrix; a different format (a Q4_K_M file's Q6_K v beside Q4_K q and k) stays a
        separate part, multiplied by the same quantized activations.
        """
        parts: list[QuantizedWeight] = []
        for part in (p for t in tensors for p in t.parts):
            prev = parts[-1] if parts else None
            fmt = _common_format(prev.format, part.format) if prev else None
            if fmt and prev.out_features % TILE_ROWS == 0:
                packed = torch.cat([prev.packed, part.packed])
                fused = prev.out_features + part.out_features
                parts[-1] = QuantizedWeight(packed, fmt, fused, part.in_features)
            else:
                parts.append(part)
        return cls(parts)


def _common_format(a: PackFormat, b: PackFormat) -> PackFormat | None:
    """A format both packed matrices already are, byte for byte (6-bit is 8-bit storage)."""
    if a == b:
        return a
    same_storage = {a.bits, b.bits} == {6, 8} and not (a.symmetric or b.symmetric)
    if same_storage and (a.group, a.scale_bytes) == (b.group, b.scale_bytes):
        return PackFormat(8, a.group, a.scale_bytes)
    return None
