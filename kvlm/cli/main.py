"""`kvlm` entry point: parse the command line, run one command, turn bad input into exit 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from kvlm.cli import bench, chat, evaluate, generate, memory, serve, visualize
from kvlm.cli.common import EXIT_USAGE, USER_ERRORS, Parser

EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


def build_parser() -> Parser:
    parser = Parser(
        prog="kvlm",
        description="kvlm: an LLM inference engine whose centre is the KV cache.",
    )
    subparsers = parser.add_subparsers(
        title="commands", dest="command", required=True, parser_class=Parser
    )
    generate.add_parser(subparsers)
    chat.add_parser(subparsers)
    bench.add_parser(subparsers)
    serve.add_parser(subparsers)
    memory.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    visualize.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `kvlm ARGV`; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`kvlm generate ... | head`)
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
