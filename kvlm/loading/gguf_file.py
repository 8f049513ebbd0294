"""A fast GGUF reader: key/value metadata and tensor descriptions, tensor data by mmap.

`gguf.GGUFReader` builds two numpy views per array element, which takes ~12 s for Gemma 3's
262,144-token vocabulary. Here the header is walked once with `struct` over an mmap: strings
are decoded only for the keys asked for, numeric arrays become one `np.frombuffer` copy.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 kv count,
then per kv: string key, u32 value type, value. A string is a u64 byte length plus UTF-8 bytes;
an array is a u32 element type, a u64 count, then the elements. Then per tensor: string name,
u32 n_dims, u64 dims (innermost first), u32 ggml type, u64 offset into the data section, which
starts at the next multiple of `general.alignment` (default 32) after the tensor descriptions.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_ARRAY_HEADER = struct.Struct("<IQ")
_DEFAULT_ALIGNMENT = 32


class GGUFFormatError(ValueError):
    """The file is not GGUF, or its header or data is truncated or malformed."""


# Fixed-size scalar types: struct format code per GGUF value type.
_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


class _Cursor:
    """Walks a read-only buffer; `offset` always points at the next unread byte."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.size = len(buf)
        self.offset = 0
        self.path = path

    def corrupt(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"GGUF file {self.path} is corrupt: {what} at byte {self.offset}")

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        if self.offset + fmt.size > self.size:
            raise self.corrupt("metadata runs past the end of the file")
        values = fmt.unpack_from(self.buf, self.offset)
        self.offset += fmt.size
        return values

    def string(self, keep: bool) -> str | None:
        (length,) = self.unpack(_U64)
        start, end = self.offset, self.offset + length
        if end > self.size:
            raise self.corrupt(f"a string of {length} bytes runs past the end of the file")
        self.offset = end
        if not keep:
            return None
        try:
            return self.buf[start:end].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.corrupt(f"string is not UTF-8 ({e})") from e

    def string_array(self, count: int, keep: bool) -> list[str] | None:
        # The hot loop for 262k-token vocabularies: locals only, no per-item bounds method calls.
        buf, offset, size, unpack = self.buf, self.offset, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (length,) = unpack(buf, offset)
                offset += 8
                if keep:
                    append(buf[offset : offset + length].decode("utf-8"))
                offset += length
        except (struct.error, UnicodeDecodeError) as e:
            self.offset = offset
            raise self.corrupt(f"bad string array ({e})") from e
        if offset > size:
            raise self.corrupt("a string array runs past the end of the file")
        self.offset = offset
        return out if keep else None

    def value(self, value_type: int, keep: bool) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string(keep)
        if value_type == GGUFValueType.ARRAY:
            element_type, count = self.unpack(_ARRAY_HEADER)
            return self.array(element_type, count, keep)
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise self.corrupt(f"unknown value type {value_type}")
        (value,) = self.unpack(struct.Struct("<" + fmt))
        return value

    def array(self, element_type: int, count: int, keep: bool) -> Any:
        if element_type == GGUFValueType.STRING:
            return self.string_array(count, keep)
        fmt = _SCALAR_FORMATS.get(element_type)
        if fmt is None:  # nested arrays: rare, walk them one by one
            items = [self.value(element_type, keep) for _ in range(count)]
            return items if keep else None
        dtype = np.dtype("<" + fmt)
        nbytes = count * dtype.itemsize
        if self.offset + nbytes > self.size:
            raise self.corrupt(f"an array of {count} items runs past the end of the file")
        values = np.frombuffer(self.buf, dtype, count, self.offset).copy() if keep else None
        self.offset += nbytes
        return values


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first): GGUF's dims reversed
    tensor_type: GGMLQuantizationType
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFContents:
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]


def read_gguf_metadata(
    path: str | Path, keep: Callable[[str], bool] = lambda key: True
) -> dict[str, Any]:
    """Every metadata key of a GGUF file for which `keep(key)` is true, mapped to its value.

    Scalars become Python numbers/bools/str, string arrays `list[str]`, numeric arrays a numpy
    array (a copy: nothing refers to the file once this returns). Raises GGUFFormatError when the
    file is not GGUF v2/v3 or its metadata is truncated or malformed.
    """
    return read_gguf(path, keep, with_tensors=False).metadata


def read_gguf(
    path: str | Path, keep: Callable[[str], bool] = lambda key: True, with_tensors: bool = True
) -> GGUFContents:
    """Metadata (as `read_gguf_metadata`) plus, when asked, where each tensor's bytes lie."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            num_tensors, metadata = _read(cur, keep)
            tensors = _read_tensor_infos(cur, num_tensors, metadata) if with_tensors else []
            return GGUFContents(metadata, tensors)
    except GGUFFormatError:
        raise
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise GGUFFormatError(f"cannot read GGUF file {path}: {e}") from e


def read_tensor_bytes(path: str | Path, info: GGUFTensorInfo) -> np.ndarray:
    """The raw bytes of one tensor, as GGUF stores them: [rows, bytes per row] uint8."""
    row_bytes = info.nbytes // max(1, int(np.prod(info.shape[:-1])))
    data = np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.start)
    if data.size != info.nbytes:
        raise GGUFFormatError(
            f"GGUF file {path} is truncated: tensor {info.name!r} needs {info.nbytes} bytes "
            f"at byte {info.start}, the file has {data.size} there"
        )
    return data.reshape(-1, row_bytes)


def _read_tensor_infos(
    cur: _Cursor, num_tensors: int, metadata: dict[str, Any]
) -> list[GGUFTensorInfo]:
    raw = []
    for _ in range(num_tensors):
        name = cur.string(keep=True)
        (n_dims,) = cur.unpack(_U32)
        if n_dims > 8:
            raise cur.corrupt(f"tensor {name!r} claims {n_dims} dimensions")
        dims = cur.unpack(struct.Struct(f"<{n_dims}Q"))
        type_id, offset = cur.unpack(struct.Struct("<IQ"))
        try:
            tensor_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise cur.corrupt(f"tensor {name!r} has unknown type id {type_id}") from None
        raw.append((name, tuple(reversed(dims)), tensor_type, offset))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.offset // alignment) * alignment
    infos = []
    for name, shape, tensor_type, offset in raw:
        block_elems, block_bytes = GGML_QUANT_SIZES[tensor_type]
        nbytes = int(np.prod(shape)) // block_elems * block_bytes
        infos.append(GGUFTensorInfo(name, shape, tensor_type, data_start + offset, nbytes))
    return infos


def _read(cur: _Cursor, keep: Callable[[str], bool]) -> tuple[int, dict[str, Any]]:
    if cur.size < 24 or cur.buf[:4] != _MAGIC:
        raise GGUFFormatError(f"{cur.path} is not a GGUF file (it does not start with 'GGUF')")
    cur.offset = 4
    (version,) = cur.unpack(_U32)
    if version not in _SUPPORTED_VERSIONS:
        raise GGUFFormatError(
            f"GGUF file {cur.path} has version {version}; supported versions are "
            f"{', '.join(map(str, _SUPPORTED_VERSIONS))} (little-endian)"
        )
    num_tensors, num_kv = cur.unpack(struct.Struct("<QQ"))
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = cur.string(keep=True)
        assert key is not None
        (value_type,) = cur.unpack(_U32)
        wanted = keep(key)
        value = cur.value(value_type, wanted)
        if wanted:
            metadata[key] = value
    return num_tensors, metadata
