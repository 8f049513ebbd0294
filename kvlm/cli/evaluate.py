"""`kvlm eval ppl` and `kvlm eval longctx`: quality measured through the cache, to see what a
cache technique costs.

ppl: the text is prefilled in chunks (`--chunk-size`), so every token after the first chunk is
predicted from K/V read back from the cache in its storage format, window and sinks. With
`--context-tokens N` only the text after its first N tokens is scored, read through the cache of
those N (pressed first with `--kv-press`).

longctx: facts hidden in a haystack of Python docs (bench/haystack.py), each answer scored after
the context's cache was pressed: exact match of the greedy answer and its log-likelihood.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvlm.bench.haystack import (
    CHARS_PER_TOKEN_BOUND,
    HaystackConfig,
    HaystackError,
    reference_text,
    score_task,
)
from kvlm.bench.longctx import answer_scores, build_task
from kvlm.cli import common
from kvlm.cli.common import CLIError, add_model_options, check_engine_options, engine_kwargs
from kvlm.cli.press import add_kv_press_option, kv_press
from kvlm.engine.scoring import token_logprobs
from kvlm.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 4096
DEFAULT_CHUNK_SIZE = 256
DEFAULT_HAYSTACK_TOKENS = 4096
DEFAULT_NUM_FACTS = 4


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure quality (perplexity, long-context recall) through the cache",
        description=__doc__,
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
    ppl.add_argument(
        "--context-tokens",
        type=int,
        default=None,
        metavar="N",
        help="score only the text after its first N tokens, read through their cache",
    )
    add_kv_press_option(ppl, "needs --context-tokens: the first N tokens are pressed")
    ppl.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_model_options(ppl)
    ppl.set_defaults(run=run_ppl)
    add_longctx_parser(evals)


def add_longctx_parser(evals: Any) -> None:
    longctx = evals.add_parser(
        "longctx",
        help="recall of facts hidden in a long context, after its cache is pressed",
        description="Key-value facts hidden at spread depths in a haystack of Python docs "
        "(made at run time, nothing downloaded), one question per fact after it; each answer "
        "is scored after the context's cache was pressed (--kv-press): exact match (every "
        "answer token is the greedy pick) and log-likelihood.",
    )
    longctx.add_argument(
        "--context-tokens",
        type=int,
        default=DEFAULT_HAYSTACK_TOKENS,
        help=f"haystack size in tokens, facts included (default {DEFAULT_HAYSTACK_TOKENS})",
    )
    longctx.add_argument(
        "--num-facts",
        type=int,
        default=DEFAULT_NUM_FACTS,
        help=f"facts hidden, at depths (i + 0.5) / n (default {DEFAULT_NUM_FACTS})",
    )
    longctx.add_argument("--seed", type=int, default=0, help="which facts and docs (default 0)")
    longctx.add_argument(
        "--question-aware",
        action="store_true",
        help="end the pressed prompt with the question (a press's observation window sees it); "
        "default: the press sees the context alone and the question follows, as in kvpress",
    )
    add_kv_press_option(longctx, "default: the plain cache")
    longctx.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )
    add_model_options(longctx)
    longctx.set_defaults(run=run_longctx)


def read_text(path: Path | None, max_tokens: int) -> str:
    if path is None:
        text = reference_text()
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
    press = kv_press(args.kv_press)
    if press is not None and args.context_tokens is None:
        raise CLIError("--kv-press needs --context-tokens N: the first N tokens are pressed")
    if args.context_tokens is not None and not 1 <= args.context_tokens <= args.max_tokens - 2:
        raise CLIError(
            f"--context-tokens must be in [1, --max-tokens - 2 = {args.max_tokens - 2}] "
            f"(at least 2 tokens after it are scored), got {args.context_tokens}"
        )
    text = read_text(args.text, args.max_tokens)
    check_engine_options(args)
    llm = common.LLM(**ppl_engine_kwargs(args))
    token_ids = llm.tokenizer.encode(text)[: args.max_tokens]
    if len(token_ids) < 2:
        raise CLIError(f"the text has {len(token_ids)} token; perplexity needs at least 2")
    if args.context_tokens is None:
        with tqdm(total=len(token_ids), unit="tok", desc="ppl", file=sys.stderr) as bar:
            nll = -float(token_logprobs(llm.engine, token_ids, bar.update).double().mean())
    else:
        if len(token_ids) < args.context_tokens + 2:
            raise CLIError(
                f"the text has {len(token_ids)} tokens; --context-tokens {args.context_tokens} "
                "leaves fewer than 2 to score"
            )
        prompt, continuation = token_ids[: args.context_tokens], token_ids[args.context_tokens :]
        (scored,) = llm.score_continuations(
            [{"prompt_token_ids": prompt}], [continuation], SamplingParams(kv_press=press)
        )
        nll = -scored.total / len(scored.logprobs)
    result = {
        "perplexity": math.exp(nll),
        "num_tokens": len(token_ids),
        "context_tokens": args.context_tokens,
        "kv_press": args.kv_press,
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
            f"sinks {args.attention_sinks}, chunks of {args.chunk_size}"
            + (
                ""
                if args.context_tokens is None
                else f", after {args.context_tokens:,} context tokens, press {args.kv_press}"
            )
            + ")"
        )
    return 0


def run_longctx(args: argparse.Namespace) -> int:
    if args.no_cache:
        raise CLIError("eval longctx measures the cache: drop --no-cache")
    press = kv_press(args.kv_press)
    try:
        config = HaystackConfig(args.context_tokens, args.num_facts, args.seed)
        llm = common.load_llm(args)
        task = build_task(llm, config)
    except HaystackError as e:
        raise CLIError(str(e)) from None
    result = {
        **score_task(task, answer_scores(llm, task, press, args.question_aware)),
        "question_aware": args.question_aware,
        "task": "longctx",
        "backend": "kvlm",
        "model": args.model,
        "weight_format": llm.config.weight_format,
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_press": args.kv_press,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"exact match {result['exact_match']:.3f}, answer log-likelihood "
            f"{result['answer_logprob']:.3f} nats ({args.num_facts} facts in "
            f"{args.context_tokens:,} tokens, press {args.kv_press or 'none'}, "
            f"kv {args.kv_cache_dtype})"
        )
        for fact in result["facts"]:  # type: ignore[attr-defined]
            print(
                f"  depth {fact['depth']:.3f}: {'found' if fact['exact'] else 'missed'}, "
                f"log p {fact['logprob']:.3f}"
            )
    return 0
