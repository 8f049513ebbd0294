"""`kvlm memory MODEL --context N`: the KV cache a model needs, layer group by layer group.

Reads only the model's shape (a preset, a GGUF header, a config.json), never its weights, so
it answers in well under a second for a 70B model.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from kvlm.cli.common import CLIError
from kvlm.config import ModelConfig
from kvlm.engine.config import KV_CACHE_DTYPES, EngineConfig
from kvlm.kv.memory import KVMemoryError, MemoryEstimate, estimate
from kvlm.kv.quant import QUANTIZED_FORMATS, KVFormat, KVFormatError, fp8_supported
from kvlm.loading import ALIASES
from kvlm.loading.shape import FILE_AUTO_DTYPE, ModelShape, read_model_shape
from kvlm.presets import PRESETS, same_kv_layout

DEFAULT_PREFILL_CHUNK = EngineConfig.max_num_batched_tokens


def add_parser(subparsers: Any) -> None:
    presets = ", ".join(PRESETS)
    parser = subparsers.add_parser(
        "memory",
        help="how much KV cache a model needs for a context and batch",
        description="Print the KV cache MODEL needs for --batch sequences of --context tokens: "
        "bytes per token and the total, by layer group (window, sinks, format, blocks held), "
        "next to the naive multi-head figure 2 × layers × seq × d_model × bytes. Reads the "
        "model's shape only, never its weights.",
    )
    parser.add_argument(
        "model",
        help=f"a preset ({presets}), an alias ({', '.join(ALIASES)}), a .gguf file or a HF folder",
    )
    parser.add_argument(
        "--context", type=int, required=True, metavar="N", help="tokens in each sequence"
    )
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="sequences (default 1)")
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        metavar="D",
        help=f"K/V storage: {', '.join(KV_CACHE_DTYPES)}; auto (default) is the preset's "
        f"published torch_dtype (bfloat16, float16 for llama-2-7b), or {FILE_AUTO_DTYPE} "
        "for an alias or file (kvlm's default --dtype)",
    )
    parser.add_argument(
        "--sliding-window",
        type=int,
        default=None,
        metavar="W",
        help="every layer keeps at most the last W tokens (the model's own smaller windows stay)",
    )
    parser.add_argument(
        "--attention-sinks",
        type=int,
        default=0,
        metavar="S",
        help="with --sliding-window: also keep the first S tokens (StreamingLLM); the context "
        "may then exceed the model's maximum",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        metavar="P",
        help="the first P tokens of each sequence arrive as a prompt, computed in chunks; the "
        "rest are decoded one a step (default 0: all decoded, the smallest peak)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="C",
        help="prompt tokens computed per step (default: the engine's max_num_batched_tokens, "
        f"{DEFAULT_PREFILL_CHUNK}); a window group holds the chunk plus its window",
    )
    parser.add_argument(
        "--block-size", type=int, default=16, help="tokens per KV block (default 16)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.set_defaults(run=run)


def check_context(shape: ModelShape, context: int, attention_sinks: int) -> None:
    """A context past the model's maximum is an error, unless sinks let generation run on."""
    limit = shape.config.max_model_len
    if context <= limit or attention_sinks:
        return
    longer = [
        p.name
        for p in PRESETS.values()
        if same_kv_layout(p.config, shape.config) and p.config.max_model_len >= context
    ]
    hint = f"; {longer[0]} has the same KV layout and a longer context" if longer else ""
    raise CLIError(
        f"--context {context:,} is over {shape.name}'s maximum context of {limit:,} tokens: "
        f"pass --context {limit} or less{hint}, or keep a window with --sliding-window W "
        "--attention-sinks S"
    )


def resolve_kv_format(args: argparse.Namespace, shape: ModelShape) -> str:
    kv_format = shape.auto_dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    if kv_format == "fp8" and not fp8_supported():
        raise CLIError(
            f"--kv-cache-dtype fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} "
            "lacks: choose int8 (the same bytes) or upgrade torch"
        )
    return kv_format


def run(args: argparse.Namespace) -> int:
    # The engine's own checks, so every command words a bad value the same way.
    EngineConfig(
        kv_cache_dtype=args.kv_cache_dtype,
        sliding_window=args.sliding_window,
        attention_sinks=args.attention_sinks,
        block_size=args.block_size,
    )
    if args.context < 1:
        raise CLIError(f"--context must be >= 1 token, got {args.context}")
    if args.batch < 1:
        raise CLIError(f"--batch must be >= 1 sequence, got {args.batch}")
    shape = read_model_shape(args.model)
    check_context(shape, args.context, args.attention_sinks)
    kv_format = resolve_kv_format(args, shape)
    try:
        est = estimate(
            shape.config,
            args.context,
            kv_format,
            batch_size=args.batch,
            block_size=args.block_size,
            sliding_window=args.sliding_window,
            num_sinks=args.attention_sinks,
            prompt_tokens=args.prompt_tokens,
            prefill_chunk=args.prefill_chunk,
        )
    except (KVMemoryError, KVFormatError) as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(to_json(shape, est, args)))
    else:
        print(format_report(shape, est, args))
    sys.stdout.flush()
    return 0


def to_json(shape: ModelShape, est: MemoryEstimate, args: argparse.Namespace) -> dict[str, Any]:
    c = est.config
    return {
        "model": shape.name,
        "kind": shape.kind,
        "source": shape.source,
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_model_len": c.max_model_len,
        "kv_cache_dtype": est.kv_format,
        "kv_cache_dtype_option": args.kv_cache_dtype,
        "context": est.num_tokens,
        "batch": est.batch_size,
        "block_size": est.block_size,
        "sliding_window": args.sliding_window,
        "attention_sinks": args.attention_sinks,
        "prompt_tokens": args.prompt_tokens,
        "prefill_chunk": args.prefill_chunk,
        "bytes_per_token": est.bytes_per_token,
        "bytes_per_sequence": est.bytes_per_sequence,
        "total_bytes": est.total_bytes,
        "peak_at": {"num_tokens": est.peak_num_tokens, "num_new_tokens": est.peak_num_new_tokens},
        "groups": [
            {
                "layer_ids": list(g.spec.layer_ids),
                "num_layers": g.spec.num_layers,
                "window": g.spec.window,
                "sinks": g.spec.num_sinks,
                "kv_format": g.spec.kv_format,
                "bytes_per_token": g.spec.bytes_per_token,
                "page_nbytes": g.spec.page_nbytes,
                "blocks_per_sequence": g.num_blocks,
                "bytes_per_sequence": g.nbytes,
                "total_bytes": est.batch_size * g.nbytes,
            }
            for g in est.groups
        ],
        "naive": {
            "formula": "2 * layers * seq * d_model * bytes",
            "element_bytes": est.naive_element_bytes,
            "bytes_per_token": est.naive_bytes_per_token,
            "total_bytes": est.naive_bytes,
        },
        "ratio": est.ratio,
        "factors": est.factors(),
    }


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units, two decimals (bytes below 1 KiB as a whole number)."""
    if abs(n) < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:,.2f} {unit}"


def _attention_kind(c: ModelConfig) -> str:
    if c.num_kv_heads == c.num_heads:
        return "MHA"
    if c.num_kv_heads == 1:
        return "MQA"
    return f"GQA {c.num_heads // c.num_kv_heads}:1"


def _format_note(est: MemoryEstimate) -> str:
    fmt = KVFormat(est.kv_format, est.config.head_dim)
    if not fmt.is_quantized:
        return f"{fmt.nbytes // fmt.head_dim} B per value"
    return (
        f"{fmt.nbytes / fmt.head_dim:.3g} B per value ({fmt.nbytes} B per token-head of "
        f"{fmt.head_dim} values, {_plural(fmt.num_scales, 'float16 scale')} included)"
    )


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _peak_note(est: MemoryEstimate, args: argparse.Namespace) -> str:
    windowed = any(g.spec.window is not None for g in est.groups)
    if est.peak_num_new_tokens > 1:
        where = (
            f"at the prefill chunk of {est.peak_num_new_tokens:,} tokens that ends at "
            f"{est.peak_num_tokens:,}: a window group holds the chunk plus its window"
        )
    else:
        where = f"when the cache holds {est.peak_num_tokens:,} tokens"
    note = f"  peak {where}"
    if windowed and args.prompt_tokens == 0:
        note += (
            "; every token decoded\n  (a prompt computed in chunks of "
            f"{args.prefill_chunk:,} holds more in window groups: see --prompt-tokens)"
        )
    return note


def format_report(shape: ModelShape, est: MemoryEstimate, args: argparse.Namespace) -> str:
    c = est.config
    if args.kv_cache_dtype == "auto":
        why = "the published torch_dtype" if shape.kind == "preset" else "kvlm's default dtype"
        auto = f" (auto: {why})"
    else:
        auto = ""
    seqs = _plural(est.batch_size, "sequence")
    lines = [
        f"{shape.name} ({shape.kind}: {shape.source})",
        f"  {c.num_layers} layers, d_model {c.hidden_size:,}, {_plural(c.num_heads, 'query head')}"
        f", {_plural(c.num_kv_heads, 'KV head')} x head_dim {c.head_dim} ({_attention_kind(c)}), "
        f"max context {c.max_model_len:,}",
        f"  KV {est.kv_format}{auto}: {_format_note(est)}",
        f"  {seqs} x {est.num_tokens:,} tokens, block size {est.block_size}",
        "",
    ]
    header = ("group", "layers", "window", "sinks", "format", "bytes/token", "blocks/seq")
    rows = [(*header, "per seq", f"x {est.batch_size}")]
    for i, g in enumerate(est.groups):
        s = g.spec
        rows.append(
            (
                str(i),
                str(s.num_layers),
                "full" if s.window is None else f"{s.window:,}",
                str(s.num_sinks),
                s.kv_format,
                human_bytes(s.bytes_per_token),
                f"{g.num_blocks:,}",
                human_bytes(g.nbytes),
                human_bytes(est.batch_size * g.nbytes),
            )
        )
    rows.append(
        ("all", str(c.num_layers), "", "", "", human_bytes(est.bytes_per_token), "")
        + (human_bytes(est.bytes_per_sequence), human_bytes(est.total_bytes))
    )
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    for r in rows:
        cells = [
            cell.ljust(w) if j < 5 else cell.rjust(w)
            for j, (cell, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())

    factors = est.factors()
    element = est.naive_element_bytes
    quantized = " (16-bit for a quantized format)" if est.kv_format in QUANTIZED_FORMATS else ""
    held = sum(g.spec.num_layers * g.tokens_held for g in est.groups) / c.num_layers
    batch = f" x {seqs}" if est.batch_size > 1 else ""
    lines += [
        "",
        f"bytes per token: {est.bytes_per_token:,} B = {human_bytes(est.bytes_per_token)} "
        "(every layer, full context, before windows)",
        f"total: {human_bytes(est.total_bytes)} = {est.total_bytes:,} B "
        "(block-rounded; windows, sinks and scales included)",
        _peak_note(est, args),
        "",
        f"naive multi-head: 2 x {c.num_layers} layers x {est.num_tokens:,} tokens x d_model "
        f"{c.hidden_size:,} x {element} B{quantized}{batch} = {human_bytes(est.naive_bytes)}",
        f"  x {factors['kv_heads']:.3f}  KV heads: {c.num_kv_heads} x {c.head_dim} = "
        f"{c.num_kv_heads * c.head_dim:,} values per token and layer, not d_model "
        f"{c.hidden_size:,}",
        f"  x {factors['format']:.3f}  format: {est.kv_format}, {_format_note(est)}",
        f"  x {factors['tokens_held']:.3f}  windows, sinks, prefill chunks, blocks: "
        f"{held:,.0f} tokens held per layer on average, of {est.num_tokens:,}",
        f"  = {human_bytes(est.total_bytes)}: {est.ratio:,.1f}x less than naive",
    ]
    return "\n".join(lines)
