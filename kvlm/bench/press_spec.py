"""`--kv-press METHOD[:RATIO][,NAME=INT...]` as text: parsed and written back the same way.

Stdlib only, like `haystack.py`, so the kvpress anchor (`benchmarks/kvpress_anchor.py`, another
virtual environment) reads the same option and labels its results the same. Which methods and
options exist is the engine's `KVPress` (or the anchor's mapping onto kvpress) to say; this
only splits the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXAMPLE = "snapkv:0.5,window=32"
FORM = "METHOD:RATIO[,NAME=INT...] (tova: tova,budget=N)"


class PressSpecError(ValueError):
    """A --kv-press value that does not parse; the message shows the form."""


@dataclass(frozen=True)
class PressSpec:
    method: str
    ratio: float | None  # None: none written (tova keeps a budget instead)
    options: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The text form, options in the order written: `snapkv:0.5,window=32`,
        `tova,budget=256`."""
        head = self.method if self.ratio is None else f"{self.method}:{self.ratio:g}"
        return ",".join([head] + [f"{k}={v}" for k, v in self.options.items()])


def parse_press(text: str) -> PressSpec:
    """`knorm:0.5`, `snapkv:0.75,window=32`, `streaming_llm:0.5,num_sinks=4`,
    `tova,budget=256`."""
    head, *rest = text.split(",")
    method, colon, ratio_text = head.partition(":")
    if not method or (colon and not ratio_text):
        raise PressSpecError(f"--kv-press {text!r}: write {FORM}, e.g. {EXAMPLE}")
    ratio = _ratio(text, ratio_text) if colon else None
    options: dict[str, int] = {}
    for item in rest:
        name, equals, value = item.partition("=")
        if not (name.isidentifier() and equals):
            raise PressSpecError(f"--kv-press {text!r}: {item!r} is not NAME=INT, e.g. window=32")
        if name in options:
            raise PressSpecError(f"--kv-press {text!r}: {name} is given twice")
        try:
            options[name] = int(value)
        except ValueError:
            raise PressSpecError(
                f"--kv-press {text!r}: {name}={value!r} is not an integer"
            ) from None
    return PressSpec(method, ratio, options)


def _ratio(text: str, ratio_text: str) -> float:
    try:
        return float(ratio_text)
    except ValueError:
        raise PressSpecError(
            f"--kv-press {text!r}: the ratio {ratio_text!r} is not a number"
        ) from None
