"""The replay page: `replay.html` (HTML, CSS and JS in one file, nothing fetched, so it works
offline) with one recording inlined as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from kvlm.viz.recorder import Recording

_PLACEHOLDER = "/*__KVLM_DATA__*/null"
_DIGITS = 3  # K/V values are shown as colours: three decimals are plenty


def recording_json(recording: Recording) -> dict[str, Any]:
    """The recording as plain JSON values; K/V rounded, work counts as [projections, pairs]."""
    data = asdict(recording)
    for key in ("keys", "values"):
        data[key] = [
            [None if row is None else [round(v, _DIGITS) for v in row] for row in layer]
            for layer in data[key]
        ]
    for step in data["steps"]:
        for key in ("with_cache", "without_cache"):
            work = step[key]
            step[key] = [work["kv_projections"], work["attention_pairs"]]
    return data


def render_page(recording: Recording) -> str:
    template = resources.files("kvlm.viz").joinpath("replay.html").read_text("utf-8")
    payload = json.dumps(recording_json(recording), separators=(",", ":"), ensure_ascii=False)
    # Inside <script>: no "</" may close the element early, and U+2028/9 end JS lines.
    payload = (
        payload.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    )
    assert template.count(_PLACEHOLDER) == 1
    return template.replace(_PLACEHOLDER, payload)


def write_page(recording: Recording, path: Path) -> None:
    path.write_text(render_page(recording), encoding="utf-8")
