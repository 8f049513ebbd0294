"""Built-in chat templates: chosen by architecture only for a GGUF file that has none."""

from __future__ import annotations

import logging

import pytest

from kvlm.tokenizer.builtin_templates import builtin_template
from kvlm.tokenizer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gemma3(gemma3_path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_path)


def test_gemma_without_a_template_gets_the_built_in_one(gemma3_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kvlm.tokenizer.tokenizer"):
        tokenizer = Tokenizer.from_gguf(gemma3_path)
    assert tokenizer.chat_template_origin == "built-in gemma"
    assert [r.message for r in caplog.records if "built-in" in r.message] == [
        f"{gemma3_path} has no tokenizer.chat_template; using kvlm's built-in 'gemma' template "
        "for architecture 'gemma3'"
    ]
    assert tokenizer.encode("<end_of_turn>", add_special_tokens=False)[0] in (
        tokenizer.stop_token_ids
    )


def test_gemma_turns_render_in_gemma_format(gemma3: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " hi "},
        {"role": "assistant", "content": "hello"},
        {"role": "tool", "content": "18 C"},
        {"role": "user", "content": "and?"},
    ]
    assert gemma3.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n"
        "<start_of_turn>model\nhello<end_of_turn>\n"
        "<start_of_turn>user\n18 C<end_of_turn>\n"
        "<start_of_turn>user\nand?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert gemma3.apply_chat_template([{"role": "system", "content": "S"}], False) == (
        "<bos><start_of_turn>user\nS<end_of_turn>\n"
    )


def test_a_file_with_its_own_template_keeps_it(smollm2_path) -> None:
    tokenizer = Tokenizer.from_gguf(smollm2_path)
    assert tokenizer.chat_template_origin == "model files"
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_an_unknown_architecture_has_no_built_in_template() -> None:
    assert builtin_template("llama") is None
    assert builtin_template("gemma3") is not None
