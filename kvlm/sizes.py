"""Sizes written as text (`"512MiB"`, `"2GB"`, `"1.5G"`): the one value type engine settings
and offload tiers share. A leaf module: it imports nothing of kvlm, so every layer may use it.
"""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


class SizeError(ValueError):
    """A size kvlm cannot read; the message shows the expected form."""


def parse_bytes(value: int | str) -> int:
    """`1073741824`, `"512MiB"`, `"2GB"` or `"1.5G"` -> bytes (binary units throughout)."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise SizeError(f"cannot read {value!r} as a size; write e.g. 512MiB or 2GiB")
    number, unit = float(m.group(1)), m.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))
