"""`StructuredOutputsParams` -> a compiled llguidance grammar, checked before any compute.

llguidance (a Rust grammar engine: Earley parser over a derivative-based lexer, used by vLLM and
llama.cpp) compiles JSON schemas, regexes, Lark and GBNF grammars against the model's token
trie. Compiling is the check: a schema with a keyword it does not implement, an invalid regex,
a grammar that does not parse, or one whose first step allows no token at all is refused with
`StructuredOutputsError`, saying why. Each distinct constraint is compiled once per mask lane
(an LRU of `CompiledGrammar`s); a request gets a copy of its lane's matcher and its first mask.

Why lanes: llguidance's copies of one matcher share its lexer behind a lock, held for the
whole of a mask, so threads computing masks of copies of one grammar take turns (2 threads x 8
rows x 60 steps: 203 ms against 92 ms for 1 thread x 8 rows; matchers compiled apart: 96 ms;
AMD EPYC Zen 4). A lane's matcher is compiled on its own, so each mask thread works on the
matchers of its lane without waiting for another's.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import llguidance
import torch

from kvlm.sampling.structured_params import StructuredOutputsParams

# JSON as json.dumps writes it (", " and ": "), no other whitespace: a small model left free
# to add whitespace can spend its whole budget on newlines. A schema's "x-guidance" overrides.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = '{"type": "object"}'
CACHE_SIZE = 64  # (constraint, lane) pairs kept compiled


class StructuredOutputsError(ValueError):
    """A constraint the grammar engine cannot use; the message says what and why."""


@dataclass(frozen=True)
class CompiledGrammar:
    """A matcher at the grammar's start, never advanced (requests take `deep_copy()`s), and
    the tokens it allows at that first step."""

    matcher: llguidance.LLMatcher
    first_allowed: torch.Tensor  # [ceil(vocab_size / 32)] int32 bitmask; read-only


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for the constraint; StructuredOutputsError for a grammar text
    (GBNF) that does not convert."""
    match spec.kind:
        case "json":
            assert spec.json is not None and isinstance(spec.json, str)
            return llguidance.LLMatcher.grammar_from_json_schema(spec.json, defaults=JSON_OPTIONS)
        case "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT, defaults=JSON_OPTIONS)
        case "regex":
            assert spec.regex is not None
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        case "choice":
            # Each choice a Lark string literal (JSON escapes are Lark's), as llguidance does.
            assert spec.choice is not None
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec.choice)
            )
        case _:
            assert spec.grammar is not None
            try:
                return llguidance.grammar_from("grammar", spec.grammar)
            except ValueError as e:
                raise StructuredOutputsError(f"the grammar does not parse: {e}") from e


class GrammarCompiler:
    """Compiles constraints for one model's vocabulary; safe to call from any thread.

    The llguidance tokenizer is built on first use (`make_tokenizer`: seconds for a large
    vocabulary), so engines that never see a constrained request never pay for it.
    """

    def __init__(
        self, make_tokenizer: Callable[[], llguidance.LLTokenizer], vocab_size: int
    ) -> None:
        self._make_tokenizer = make_tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[StructuredOutputsParams, int], CompiledGrammar] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            return self._tokenizer

    def compile(self, spec: StructuredOutputsParams, lane: int = 0) -> CompiledGrammar:
        """The constraint compiled for mask lane `lane` (from the cache when seen before; no
        two lanes share a matcher); StructuredOutputsError when it cannot be used."""
        tokenizer = self.tokenizer
        key = (spec, lane)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(spec, tokenizer)
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(
        self, spec: StructuredOutputsParams, tokenizer: llguidance.LLTokenizer
    ) -> CompiledGrammar:
        what = _DESCRIPTIONS[spec.kind]
        try:
            grammar = grammar_text(spec)
        except ValueError as e:  # the JSON text of a schema
            raise StructuredOutputsError(f"{what} cannot be used: {e}") from e
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise StructuredOutputsError(f"{what} cannot be used: {_summary(messages[0])}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        allowed = empty_mask(self.vocab_size)
        fill_mask(matcher, allowed)
        if matcher.is_error() or matcher.is_stopped():
            raise StructuredOutputsError(
                f"{what} allows no output at all: no token can start it"
                + (f" ({_summary(matcher.get_error())})" if matcher.is_error() else "")
            )
        return CompiledGrammar(matcher, allowed)


def empty_mask(vocab_size: int) -> torch.Tensor:
    """A next-token bitmask to fill: [ceil(vocab_size / 32)] int32."""
    return torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)


def fill_mask(matcher: llguidance.LLMatcher, allowed: torch.Tensor) -> None:
    """Write `matcher`'s next-token mask into `allowed` ([ceil(vocab_size / 32)] int32,
    contiguous): bit j of word w set = token 32 * w + j allowed. Drops the GIL while
    llguidance walks the token trie."""
    assert allowed.dtype == torch.int32 and allowed.is_contiguous() and allowed.dim() == 1
    matcher.unsafe_compute_mask_ptr(allowed.data_ptr(), allowed.nbytes)


def _summary(message: str, limit: int = 300) -> str:
    """llguidance's message on one line (its source excerpts and parser state dropped)."""
    lines = [line.strip() for line in message.split("<state>")[0].splitlines()]
    text = " ".join(line for line in lines if line and not line[:1].isdigit() and line != "^")
    text = text or "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_DESCRIPTIONS = {
    "json": "the JSON schema",
    "json_object": "the JSON object constraint",
    "regex": "the regex",
    "choice": "the choice",
    "grammar": "the grammar",
}
