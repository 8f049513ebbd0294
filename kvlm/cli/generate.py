"""`kvlm generate PROMPT`: stream one completion to stdout, then a stats line to stderr."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from kvlm.cli.common import (
    CLIError,
    add_model_options,
    add_prefix_adapter_option,
    add_sampling_options,
    load_llm,
    sampling_params,
    stream_to_stdout,
    the_prefix_adapter,
)
from kvlm.cli.press import add_kv_press_option, kv_press
from kvlm.cli.stats import format_generate_stats, turn_stats
from kvlm.engine.llm import LLM

DEFAULT_MAX_TOKENS = 64


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="complete one prompt, streaming the text",
        description="Complete PROMPT, streaming text to stdout as it is produced; a stats line "
        "(time to first token, decode speed, token counts, KV cache held and, with --kv-press, "
        "held after the press, weight format) goes to stderr.",
    )
    parser.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    parser.add_argument(
        "--chat", action="store_true", help="send PROMPT as one user message via the chat template"
    )
    add_model_options(parser)
    add_prefix_adapter_option(parser, "the prompt runs with it")
    add_sampling_options(parser, max_tokens=DEFAULT_MAX_TOKENS)
    add_kv_press_option(parser, "the prompt (with --chat: the templated prompt) is pressed")
    parser.set_defaults(run=run)


def read_prompt(args: argparse.Namespace) -> str:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise CLIError("prompt is empty: give at least one character of text")
    return prompt


def encode(llm: LLM, prompt: str, chat: bool) -> dict[str, Any]:
    if not chat:
        return {"prompt": prompt}
    messages = [{"role": "user", "content": prompt}]
    return {"prompt_token_ids": llm.tokenizer.encode_chat(messages)}


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    params = dataclasses.replace(sampling_params(args), kv_press=kv_press(args.kv_press))
    adapter = the_prefix_adapter(args)
    llm = load_llm(args)
    last = stream_to_stdout(llm, encode(llm, prompt, args.chat), params, adapter)
    print(format_generate_stats(turn_stats(llm.engine, last.metrics)), file=sys.stderr)
    return 0
