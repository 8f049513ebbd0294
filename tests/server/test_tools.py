"""Tools without a model: the incremental parser gives the same content and calls however the
text is cut into pieces, the tool grammar holds what each tool_choice allows, and a chat
template that reads `tools` renders them (and earlier calls) itself."""

from __future__ import annotations

import json
import random

import pytest

from kvlm.sampling.structured import StructuredDecoder
from kvlm.sampling.structured_params import StructuredOutputsParams
from kvlm.server.protocol import ChatCompletionRequest
from kvlm.server.tool_parser import ToolCallParser, parse_all
from kvlm.server.tools import plan_tools
from kvlm.tokenizer import Tokenizer
from kvlm.tokenizer.chat_template import ChatTemplate
from kvlm.tokenizer.llguidance_bridge import llguidance_tokenizer

CALL = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
TEXTS = [
    f"Sure. \n{CALL}\n{CALL.replace('f', 'g')}  ",
    "no call here, but <tool_c and a < sign",
    f"{CALL[:30]}",  # cut short by max_tokens: stays content
    "<tool_call>\nnot json\n</tool_call> after",
]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
    "additionalProperties": False}}}  # fmt: skip


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_parse_equals_whole_parse(text: str) -> None:
    content, calls = parse_all(text)
    rng = random.Random(0)
    for _ in range(100):
        parser, got_content, got_calls, i = ToolCallParser(), "", [], 0
        while i < len(text):
            j = i + rng.randint(1, 5)
            piece = parser.feed(text[i:j])
            got_content, got_calls, i = got_content + piece.content, got_calls + piece.calls, j
        got_content += parser.finish().content
        assert (got_content or None) == content
        assert [(c.name, c.arguments) for c in got_calls] == [(c.name, c.arguments) for c in calls]
    if text.startswith("Sure"):
        assert content == "Sure." and [c.name for c in calls] == ["f", "g"]
        assert json.loads(calls[0].arguments) == {"a": 1}
    else:
        assert calls == [] and content == text.rstrip()


@pytest.fixture(scope="module")
def decoder(smollm2_path) -> tuple[StructuredDecoder, Tokenizer]:
    tokenizer = Tokenizer.from_gguf(smollm2_path)
    vocab = tokenizer.vocab_size
    decoder = StructuredDecoder(lambda: llguidance_tokenizer(tokenizer, vocab, [2]), vocab)
    yield decoder, tokenizer
    decoder.close()


def _accepts(decoder: tuple[StructuredDecoder, Tokenizer], grammar: str, text: str) -> bool:
    structured, tokenizer = decoder
    matcher = structured.start(StructuredOutputsParams(grammar=grammar)).matcher
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "accepted", "refused"),
    [
        ("auto", True, ["Hello!", f"Let me see. {CALL}", f"{CALL}\n{CALL}"],
         ["<tool_call>\nnot json\n</tool_call>"]),
        ("required", True, [CALL, f"{CALL}\n{CALL}"], ["Hello!", f"Hi {CALL}"]),
        ("required", False, [CALL], [f"{CALL}\n{CALL}"]),
        ({"type": "function", "function": {"name": "f"}}, True, [CALL], ["Hello!"]),
    ],
)  # fmt: skip
def test_tool_grammar_holds_the_choice(
    decoder: tuple[StructuredDecoder, Tokenizer],
    tool_choice: object,
    parallel: bool,
    accepted: list[str],
    refused: list[str],
) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": [TOOL],
            "tool_choice": tool_choice, "parallel_tool_calls": parallel}  # fmt: skip
    grammar = plan_tools(ChatCompletionRequest.model_validate(body)).grammar()
    for text in accepted:
        assert _accepts(decoder, grammar, text), text
    for text in refused:
        assert not _accepts(decoder, grammar, text), text


def test_a_template_that_reads_tools_renders_them() -> None:
    source = (
        "{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.a }}"
        "{% endfor %}\n{% endfor %}"
    )
    template = ChatTemplate(source, {})
    assert template.reads_tools and not ChatTemplate("{{ messages }}", {}).reads_tools
    messages = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
            ],
        }
    ]
    assert template.render(messages, False, [TOOL]) == "TOOL f\nassistant: CALL f 1"  # fmt: skip
