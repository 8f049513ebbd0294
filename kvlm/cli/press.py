"""`--kv-press METHOD:RATIO[,NAME=INT...]` (`tova,budget=N`): the option, and the `KVPress`
it names."""

from __future__ import annotations

import argparse
from dataclasses import fields

from kvlm.bench.press_spec import EXAMPLE, FORM, PressSpecError, parse_press
from kvlm.cli.common import CLIError
from kvlm.sampling import KVPress

POSITIONAL = ("method", "ratio")  # written as METHOD:RATIO, not as options


def add_kv_press_option(parser: argparse.ArgumentParser, applies: str) -> None:
    options = ", ".join(f.name for f in fields(KVPress) if f.name not in POSITIONAL)
    parser.add_argument(
        "--kv-press",
        default=None,
        metavar="METHOD:RATIO[,NAME=INT]",
        help=f"compress the prompt's KV cache once it is prefilled, e.g. {EXAMPLE} (ratio = the "
        f"fraction of cached tokens dropped; options: {options}), or keep N cached tokens while "
        f"generating: tova,budget=N; {applies}",
    )


def kv_press(text: str | None) -> KVPress | None:
    """The press `--kv-press` names, or None; a bad value raises one user error (exit 2)."""
    if text is None:
        return None
    try:
        spec = parse_press(text)
    except PressSpecError as e:
        raise CLIError(str(e)) from None
    names = {f.name for f in fields(KVPress)} - set(POSITIONAL)
    for name in spec.options:
        if name not in names:
            raise CLIError(
                f"--kv-press {text!r}: no option {name!r}; a press takes {', '.join(sorted(names))}"
            )
    press = KVPress(spec.method, spec.ratio, **spec.options)  # KVPressError: a user error
    if spec.ratio is None and not press.keeps_budget:  # no default ratio on the command line
        raise CLIError(f"--kv-press {text!r}: {press.method} drops a ratio; write {FORM}")
    return press
