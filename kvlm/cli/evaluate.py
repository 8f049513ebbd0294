"""`kvlm eval ppl`: perplexity computed through the cache, to see what a cache technique costs.

The text is prefilled in chunks (`--chunk-size`), so every token after the first chunk is
predicted from K/V read back from the cache in its storage format, window and sinks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvlm.cli.common import CLIError, add_model_options, check_engine_options, engine_kwargs
from kvlm.engine.llm import LLM
from kvlm.engine.scoring import token_logprobs

DEFAULT_MAX_TOKENS = 4096
DEFAULT_CHUNK_SIZE = 256
CHARS_PER_TOKEN_BOUND = 16  # read at most this many characters per wanted token


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure quality (perplexity) through the cache", description=__doc__
    )
    evals = parser.add_subparsers(title="evaluations", dest="evaluation", required=True)
    ppl = evals.add_parser(
        "ppl",
        help="perplexity of a text through the cache",
        description="Perplexity of a text (default: English from CPython's pydoc_data.topics), "
        "prefilled through the cache in chunks so later tokens read quantized or windowed K/V.",
    )
    ppl.add_argument("--text", type=Path, default=None, help="a UTF-8 text file (default: docs)")
    ppl.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"score the first N tokens of the text (default {DEFAULT_MAX_TOKENS})",
    )
    ppl.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"tokens prefilled per step (default {DEFAULT_CHUNK_SIZE})",
    )
    ppl.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_model_options(ppl)
    ppl.set_defaults(run=run_ppl)


def default_text() -> str:
    """English prose and code from the Python reference, shipped with CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: Path | None, max_tokens: int) -> str:
    if path is None:
        text = default_text()
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"cannot read {path}: {e}") from None
    text = text[: max_tokens * CHARS_PER_TOKEN_BOUND]
    if not text.strip():
        raise CLIError(f"{path or 'the text'} is empty")
    return text


def ppl_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {**engine_kwargs(args), "max_num_batched_tokens": args.chunk_size}


def run_ppl(args: argparse.Namespace) -> int:
    if args.max_tokens < 2:
        raise CLIError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.chunk_size < 1:
        raise CLIError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.no_cache:
        raise CLIError("eval ppl measures the cache: drop --no-cache")
    text = read_text(args.text, args.max_tokens)
    check_engine_options(args)
    llm = LLM(**ppl_engine_kwargs(args))
    token_ids = llm.tokenizer.encode(text)[: args.max_tokens]
    if len(token_ids) < 2:
        raise CLIError(f"the text has {len(token_ids)} token; perplexity needs at least 2")
    with tqdm(total=len(token_ids), unit="tok", desc="ppl", file=sys.stderr) as bar:
        logprobs = token_logprobs(llm.engine, token_ids, bar.update)
    nll = -float(logprobs.double().mean())
    result = {
        "perplexity": math.exp(nll),
        "num_tokens": len(token_ids),
        "model": args.model,
        "weight_format": llm.config.weight_format,  # "auto" resolved
        "kv_cache_dtype": args.kv_cache_dtype,
        "sliding_window": args.sliding_window,
        "attention_sinks": args.attention_sinks,
        "chunk_size": args.chunk_size,
        "kv_bytes_per_token": sum(s.bytes_per_token for s in llm.engine.kv_specs),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"perplexity {result['perplexity']:.4f} over {len(token_ids):,} tokens "
            f"({result['weight_format']} weights, kv {args.kv_cache_dtype}, "
            f"window {args.sliding_window or 'model'}, "
            f"sinks {args.attention_sinks}, chunks of {args.chunk_size})"
        )
    return 0
