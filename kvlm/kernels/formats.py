"""Quantized weight matrices in the kernels' layout, and their exact float reference.

A matrix [N, K] is stored as `w = d * q + m` per row and per group of G columns, q unsigned
with `bits` giving its range: 4 (0..15, two per byte), 6 (0..63, one per byte: Q5_* and Q6_K,
which lets the AVX2 kernel skip its saturation guard) or 8 (0..255, one per byte); d and m
fp16 when that is exact, else fp32; m not stored where it is -128 d (Q8_0). Every GGUF format
kvlm reads maps onto this without rounding (see `gguf_repack`). `PlainQuant` is the row-major
form (one q per byte) that loaders build, permute and concatenate; `QuantizedWeight` is the
packed form the kernels read: tiles of 16 rows, blocks of G columns (layout in csrc/qgemm.h).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlm.kernels.build import resolve_path

TILE_ROWS = 16
ACT_BLOCK = 32  # activations are quantized in blocks of 32 columns; K is padded to it


@dataclass(frozen=True)
class PackFormat:
    bits: int  # q < 2 ** bits: 4 (packed in nibbles), 6 or 8 (one byte each)
    group: int  # columns per scale: 32, or 16 (Q6_K)
    scale_bytes: int  # 2 (fp16) or 4 (fp32)
    # 8-bit only: no minimums stored, m = -128 d (Q8_0's int8 values held as q + 128); its
    # blocks are 16 * scale_bytes smaller (Gemma 3's 262,144-row embedding: 6% fewer bytes).
    symmetric: bool = False

    def __post_init__(self) -> None:
        if (self.bits, self.group) not in ((4, 32), (6, 32), (6, 16), (8, 32), (8, 16)):
            raise ValueError(f"no kernel for {self.bits}-bit weights in groups of {self.group}")
        if self.scale_bytes not in (2, 4):
            raise ValueError(f"scale_bytes must be 2 or 4, got {self.scale_bytes}")
        if self.symmetric and self.bits != 8:
            raise ValueError("only 8-bit weights are stored without minimums")

    @property
    def storage_bits(self) -> int:
        return 4 if self.bits == 4 else 8

    @property
    def quant_bytes(self) -> int:
        return TILE_ROWS * self.group * self.storage_bits // 8

    @property
    def block_bytes(self) -> int:
        return self.quant_bytes + (1 if self.symmetric else 2) * TILE_ROWS * self.scale_bytes

    @property
    def name(self) -> str:
        kind = "s" if self.symmetric else "u"
        return f"{kind}{self.bits}g{self.group}{'f16' if self.scale_bytes == 2 else 'f32'}"


@dataclass
class PlainQuant:
    """Row-major quantized matrix: w[n, k] = d[n, k // G] * q[n, k] + m[n, k // G]."""

    q: torch.Tensor  # [N, Kp] uint8, Kp = in_features padded to a multiple of 32 (pad q = 0)
    d: torch.Tensor  # [N, Kp / G] float32
    m: torch.Tensor  # [N, Kp / G] float32
    bits: int
    group: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: exactly what llama.cpp's dequantization gives for GGUF sources."""
        num_rows, padded = self.q.shape
        groups = self.q.view(num_rows, padded // self.group, self.group).float()
        w = groups * self.d[..., None] + self.m[..., None]  # two roundings, like ggml's
        return w.view(num_rows, padded)[:, : self.in_features]

    def permute_rows(self, order: torch.Tensor) -> PlainQuant:
        return PlainQuant(
            self.q[order], self.d[order], self.m[order], self.bits, self.group, self.in_features
        )

    def widened(self, bits: int, group: int) -> PlainQuant:
        """The same values in a format with at least as many bits and no larger groups."""
        assert bits >= self.bits and group <= self.group and self.group % group == 0
        repeat = self.group // group
        d, m = self.d.repeat_interleave(repeat, 1), self.m.repeat_interleave(repeat, 1)
        return PlainQuant(self.q, d, m, bits, group, self.in_features)

    @staticmethod
    def cat(parts: list[PlainQuant]) -> PlainQuant:
        """Stack along out_features, widening to the most general format among the parts."""
        bits, group = max(p.bits for p in parts), min(p.group for p in parts)
        parts = [p.widened(bits, group) for p in parts]
        assert len({p.in_features for p in parts}) == 1, "stacked matrices need equal K"
        return PlainQuant(
            torch.cat([p.q for p in parts]),
            torch.cat([p.d for p in parts]),
            torch.cat([p.m for p in parts]),
            bits,
            group,
            parts[0].in_features,
        )


def _exact_in_fp16(*tensors: torch.Tensor) -> bool:
    return all(torch.equal(t.half().float(), t) for t in tensors)


@dataclass
class QuantizedWeight:
    """A packed [out_features, in_features] matrix; `packed` is [N / 16, Kp / G, block_bytes]."""

    packed: torch.Tensor  # uint8
    format: PackFormat
    out_features: int
    in_features: int
    _dense: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    @classmethod
    def pack(cls, plain: PlainQuant) -> QuantizedWeight:
        """Interleave 16 rows per tile; scales stay fp16 only where fp16 holds them exactly."""
        num_rows, padded = plain.q.shape
        bits, group = plain.bits, plain.group
        if bits == 8 and int(plain.q.max()) < 64:
            bits = 6  # Q5_*, Q6_K: small enough for AVX2's int16 pair sums to never saturate
        scale_bytes = 2 if _exact_in_fp16(plain.d, plain.m) else 4
        symmetric = bits == 8 and torch.equal(plain.m, -128.0 * plain.d)
        fmt = PackFormat(bits, group, scale_bytes, symmetric)
        pad = -num_rows % TILE_ROWS
        q, d, m = plain.q, plain.d, plain.m
        if pad:
            q = torch.cat([q, q.new_zeros(pad, padded)])
            d, m = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (d, m))
        num_tiles, num_groups = (num_rows + pad) // TILE_ROWS, padded // group
        packed = torch.empty(num_tiles, num_groups, fmt.block_bytes, dtype=torch.uint8)
        # [tiles, rows, groups, k-groups, 4] -> [tiles, groups, k-groups, rows, 4]
        q = q.view(num_tiles, TILE_ROWS, num_groups, group // 4, 4).permute(0, 2, 3, 1, 4)
        quants = packed[:, :, : fmt.quant_bytes].view(num_tiles, num_groups, -1, TILE_ROWS, 4)
        if bits == 4:
            half = group // 8
            torch.bitwise_or(q[:, :, :half], q[:, :, half:] << 4, out=quants)
        else:
            quants.copy_(q)
        scale_dtype = torch.float16 if scale_bytes == 2 else torch.float32
        size = TILE_ROWS * scale_bytes
        scales = ((fmt.quant_bytes, d),) + (() if symmetric else ((fmt.quant_bytes + size, m),))
        for offset, t in scales:
            # [N, groups] -> [tiles, groups, 16 rows] in the scale dtype, written as bytes
            dst = packed[:, :, offset : offset + size].view(scale_dtype)
            dst.copy_(t.view(num_tiles, TILE_ROWS, num_groups).transpose(1, 2))
        return cls(packed, fmt, num_rows, plain.in_features)

    def unpack(self, tiles: torch.Tensor | None = None) -> PlainQuant:
        """The row-major form (of all tiles, or of the tile indices given; then 16 rows each)."""
        fmt = self.format
        packed = self.packed if tiles is None else self.packed[tiles]
        num_tiles, num_groups, _ = packed.shape
        q = packed[:, :, : fmt.quant_bytes]
        if fmt.bits == 4:
            q = q.reshape(num_tiles, num_groups, fmt.group // 8, TILE_ROWS, 4)
            q = torch.cat([q & 0x0F, q >> 4], dim=2)
        q = q.reshape(num_tiles, num_groups, fmt.group // 4, TILE_ROWS, 4).permute(0, 3, 1, 2, 4)
        q = q.reshape(num_tiles * TILE_ROWS, num_groups * fmt.group)
        scale_dtype = torch.float16 if fmt.scale_bytes == 2 else torch.float32
        size = TILE_ROWS * fmt.scale_bytes

        def scales(offset: int) -> torch.Tensor:
            raw = packed[:, :, offset : offset + size].contiguous().view(scale_dtype).float()
            return raw.transpose(1, 2).reshape(num_tiles * TILE_ROWS, num_groups)

        d = scales(fmt.quant_bytes)
        m = -128.0 * d if fmt.symmetric else scales(fmt.quant_bytes + size)
        if tiles is None:
            q, d, m = q[: self.out_features], d[: self.out_features], m[: self.out_features]
        return PlainQuant(q, d, m, fmt.bits, fmt.group, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """[out_features, in_features] float32, exactly the source format's values."""
        return self.unpack().dequantize()

    def dense(self) -> torch.Tensor:
        """`dequantize()`, kept after the first call: the torch fallback's weight (float size)."""
        if self._dense is None:
            self._dense = self.dequantize()
        return self._dense

    def dequantize_rows(self, row_ids: torch.Tensor) -> torch.Tensor:
        """[*row_ids.shape, in_features] float32 for an embedding lookup (only their rows read).

        The C++ op where the kernels run, else in torch on the rows' tiles: the same values."""
        fmt = self.format
        if self.packed.is_cpu and resolve_path(None) != "torch":
            return torch.ops.kvlm.dequant_rows(
                self.packed,
                row_ids,
                fmt.bits,
                fmt.group,
                fmt.scale_bytes,
                self.in_features,
                self.out_features,
            )
        flat = row_ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.out_features):
            raise IndexError(f"row ids must lie in [0, {self.out_features})")
        tiles, inverse = torch.unique(torch.div(flat, TILE_ROWS, rounding_mode="floor"),
                                      return_inverse=True)  # fmt: skip
        rows = self.unpack(tiles).dequantize()  # [len(tiles) * 16, K]
        return rows[inverse * TILE_ROWS + flat % TILE_ROWS].view(*row_ids.shape, -1)
