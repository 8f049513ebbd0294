"""The `kv_press` extension field -> `KVPress`, or a 400 with `param: "kv_press"`.

The field is an object, `{"method": "snapkv", "ratio": 0.5, "window": 32, "num_sinks": 4,
"num_future_positions": 512}` or `{"method": "tova", "budget": 256}`, of which only `method`
is required (and tova's budget); its values are checked by `KVPress` (the same messages as
`--kv-press`). What depends on the engine and the prompt (a cache to press, a prompt longer
than snapkv's window or expected_attention's sinks, a budget of at least a block) is checked
by the engine at `add_request`, whose `PressRefusedError` `serving.py` turns into a 400
naming this field too.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from kvlm.sampling.press import KVPress, KVPressError
from kvlm.server.errors import APIError
from kvlm.server.protocol import json_integer

PARAM = "kv_press"
_FIELDS = tuple(f.name for f in fields(KVPress))
# JSON's 32.0 is 32, as in the other integer fields
_INTEGERS = tuple(f.name for f in fields(KVPress) if f.type in ("int", "int | None"))
EXAMPLE = '{"method": "snapkv", "ratio": 0.5}'


def requested_press(value: Any) -> KVPress | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(
            f"kv_press must be an object such as {EXAMPLE}, got a JSON {type(value).__name__}",
            param=PARAM,
        )
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise APIError(
            f"kv_press has no field {unknown[0]!r}; a press takes {', '.join(_FIELDS)}",
            param=PARAM,
        )
    if "method" not in value:
        raise APIError(f"kv_press needs a method, e.g. {EXAMPLE}", param=PARAM)
    options = {k: json_integer(v) if k in _INTEGERS else v for k, v in value.items()}
    try:
        return KVPress(**options)
    except KVPressError as e:
        raise APIError(str(e), param=PARAM) from e
