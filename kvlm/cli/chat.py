"""`kvlm chat`: a multi-turn conversation read line by line from stdin (a terminal or a pipe).

Each turn sends the whole conversation through the chat template. The previous turns' prompt
and reply are still in the prefix cache, so only the new tail is prefilled: the stats line after
each reply shows how many prompt tokens were reused. With `--session FILE` the conversation and
its K/V are saved after every turn and restored at start, so a restarted chat resumes without
recomputing the conversation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kvlm.cli.common import (
    USER_ERRORS,
    CLIError,
    add_model_options,
    add_prefix_adapter_option,
    add_sampling_options,
    load_llm,
    stream_to_stdout,
    the_prefix_adapter,
)
from kvlm.cli.common import sampling_params as make_sampling_params
from kvlm.cli.stats import format_chat_stats, turn_stats
from kvlm.engine.llm import LLM, Message
from kvlm.kv.session_file import SessionFileError
from kvlm.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 256
EXIT_COMMANDS = frozenset({"/exit", "/quit"})
RESET_COMMAND = "/reset"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="multi-turn chat on stdin, keeping the KV cache between turns",
        description="Chat with the model: one user message per stdin line; the reply streams to "
        "stdout and a stats line (prompt tokens, tokens reused from the cache, tokens "
        "prefilled, TTFT, decode speed) goes to stderr. Ends on EOF or /exit; /reset starts a "
        "new conversation. A turn the engine refuses (e.g. the conversation outgrew the "
        "context) prints `error: ...` and the chat goes on; the exit code is then 2.",
    )
    parser.add_argument("--system", default=None, help="a system message to start with")
    parser.add_argument(
        "--session",
        type=Path,
        default=None,
        metavar="FILE",
        help="resume the conversation saved in FILE (its K/V restored, not recomputed) and "
        "save it there after every turn; FILE is created when missing",
    )
    add_model_options(parser)
    add_prefix_adapter_option(parser, "every turn runs with it")
    add_sampling_options(parser, max_tokens=DEFAULT_MAX_TOKENS)
    parser.set_defaults(run=run)


@dataclass
class Conversation:
    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]


def read_line(stdin: TextIO) -> str | None:
    """The next user line without its newline; None at end of input."""
    if stdin.isatty():
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def reply(
    llm: LLM,
    conversation: Conversation,
    params: SamplingParams,
    turn: int,
    prefix_adapter: str | None = None,
) -> str:
    """Stream the assistant's answer to the conversation; returns its full text."""
    prompt_ids = llm.tokenizer.encode_chat(conversation.messages)
    last = stream_to_stdout(llm, {"prompt_token_ids": prompt_ids}, params, prefix_adapter)
    print(format_chat_stats(turn, turn_stats(llm.engine, last.metrics)), file=sys.stderr)
    return last.outputs[0].text


def resume(llm: LLM, path: Path, conversation: Conversation) -> None:
    """Load a saved conversation and its K/V; refused K/V mean the first turn recomputes."""
    try:
        session = llm.load_session(path)
    except SessionFileError as e:
        raise CLIError(f"{e}; move the file away to start a new session there") from e
    if session.messages is None:
        raise CLIError(f"session {path} holds a request, not a chat conversation")
    conversation.messages = session.messages
    total = len(session.token_ids)
    if session.refused is not None:
        print(f"warning: {session.refused}; recomputing its {total} tokens", file=sys.stderr)
    else:
        print(
            f"[session {path}: {len(session.messages)} messages, K/V of "
            f"{session.num_restored_tokens} of {total} tokens restored]",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    params = make_sampling_params(args)
    if args.session is not None and not args.session.resolve().parent.is_dir():
        raise CLIError(f"--session {args.session}: its folder does not exist")
    adapter = the_prefix_adapter(args)
    if adapter is not None and args.session is not None:
        raise CLIError("--session files do not carry a prefix adapter's K/V: drop one of them")
    llm = load_llm(args)
    conversation = Conversation(args.system)
    if args.session is not None and args.session.exists():
        resume(llm, args.session, conversation)
    llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # has a template?
    exit_code, turn = 0, 0
    while (line := read_line(sys.stdin)) is not None:
        text = line.strip()
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            conversation.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if not text:
            continue
        conversation.messages.append({"role": "user", "content": line})
        turn += 1
        try:
            answer = reply(llm, conversation, params, turn, adapter)
        except USER_ERRORS as e:  # e.g. the conversation outgrew the context: say so, go on
            conversation.messages.pop()
            print(f"error: {e} (/reset starts a new conversation)", file=sys.stderr)
            exit_code = 2
            continue
        conversation.messages.append({"role": "assistant", "content": answer})
        if args.session is not None:
            llm.save_session(conversation.messages, args.session)
    return exit_code
