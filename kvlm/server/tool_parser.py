"""Generated text -> content and tool calls, incrementally, so a stream and a whole response
carry the same result (the whole response is the stream's parse of the full text).

Text outside `<tool_call>...</tool_call>` is content, streamed as it comes, except a tail that
may still become the opening tag and trailing whitespace, held back until more text follows
(so whitespace before a call, and at the end, is dropped whatever the chunking). A call goes
out once its closing tag arrived and its JSON names a function; anything else (a call cut
short by max_tokens) stays content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvlm.server.tools import CALL_CLOSE, CALL_OPEN


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it

    def to_dict(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's tool call object (with `index` when it is a stream delta)."""
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


@dataclass
class Parsed:
    """What one `feed` or `finish` produced: new content and newly complete calls."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ToolCallParser:
    """Feed text pieces in order; `finish` once the generation ended."""

    def __init__(self) -> None:
        self._buffer = ""  # text not yet given out
        self._in_call = False
        self.num_calls = 0

    def feed(self, text: str) -> Parsed:
        self._buffer += text
        out = Parsed()
        while True:
            if self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    return out
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(CALL_CLOSE) :]
                self._in_call = False
                call = _call(body)
                if call is None:  # not a call after all: the tags and body are content
                    out.content += f"{CALL_OPEN}{body}{CALL_CLOSE}"
                else:
                    out.calls.append(call)
                    self.num_calls += 1
                continue
            start = self._buffer.find(CALL_OPEN)
            if start >= 0:
                out.content += self._buffer[:start].rstrip()
                self._buffer = self._buffer[start + len(CALL_OPEN) :]
                self._in_call = True
                continue
            keep = _partial_tag(self._buffer)
            ready = self._buffer[: len(self._buffer) - keep].rstrip()
            out.content += ready
            self._buffer = self._buffer[len(ready) :]
            return out

    def finish(self) -> Parsed:
        """The rest: an unclosed call, a held-back tail, trailing text."""
        rest = (CALL_OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return Parsed(content=rest if rest.strip() else "")


def parse_all(text: str) -> tuple[str | None, list[ParsedCall]]:
    """The whole text's content (None when empty) and calls, as a stream would give them."""
    parser = ToolCallParser()
    first, last = parser.feed(text), parser.finish()
    content = first.content + last.content
    return content or None, first.calls


def _partial_tag(text: str) -> int:
    """Length of the longest tail of `text` that begins the opening tag."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0


def _call(body: str) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    return ParsedCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        name=value["name"],
        arguments=json.dumps(arguments, ensure_ascii=False),
    )
