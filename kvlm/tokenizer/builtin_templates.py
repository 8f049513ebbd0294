"""Chat templates kvlm knows by name, for GGUF files that carry none.

llama.cpp does the same (`llm_chat_detect_template`): a base model's GGUF (Gemma 3 270M, say)
often has no `tokenizer.chat_template`, yet its family has one fixed turn format. When the file
has none, the template is chosen here by `general.architecture`; the tokenizer logs the choice
once and names it (`Tokenizer.chat_template_origin`), and a file's own template always wins.

These templates do not read `tools`: the server renders tools as its documented generic system
preamble (`kvlm/server/tools.py`, `tool_prompt`), calls and results as plain turns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinTemplate:
    name: str
    source: str  # Jinja, rendered like a file's own template


# Gemma's turn format (google/gemma-3-*-it): `<start_of_turn>user` / `<start_of_turn>model`,
# each turn closed by `<end_of_turn>`; no system role, so a system message opens the first
# user turn (a lone system message is a user turn). Unlike the shipped template it does not
# insist on strict user/model alternation: tool results (user turns) may follow each other.
GEMMA = BuiltinTemplate(
    "gemma",
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' and messages | length > 1 -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}",
)

# general.architecture -> the family's template.
BY_ARCHITECTURE = {"gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA}


def builtin_template(architecture: str) -> BuiltinTemplate | None:
    """The built-in template for a GGUF architecture, None when kvlm knows none."""
    return BY_ARCHITECTURE.get(architecture)
