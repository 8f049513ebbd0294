"""Options shared by the commands, and the errors that become one `error: ...` line.

Every command checks what it can before loading a model (sampling values, the prompt), so a
typo fails in milliseconds, not after a 15-second load.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from kvlm.adapters import AdapterError
from kvlm.config import ModelConfigError
from kvlm.engine.config import DTYPES, KV_CACHE_DTYPES, EngineConfig, EngineConfigError
from kvlm.engine.engine import InputError
from kvlm.engine.llm import LLM
from kvlm.engine.request import OutputAccumulator, RequestOutput
from kvlm.engine.speculative import METHODS as SPECULATIVE_METHODS
from kvlm.engine.weight_format import AUTO, WEIGHT_FORMAT_CHOICES
from kvlm.loading import DEFAULT_MODEL, ModelLoadError, ModelNotFoundError
from kvlm.sampling import SamplingParams, SamplingParamsError
from kvlm.tokenizer import TokenizerError

# vLLM's quick-start sampling (temperature 0.8, top-p 0.95); --temperature 0 is greedy.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
EXIT_USAGE = 2  # bad input of any kind: argparse's code for a bad command line, kept for all
WEIGHT_FORMAT_HELP = (
    "how linear weights are held: float (dequantized at load), gguf (the file's quantized "
    "blocks, on kvlm's CPU kernels), q8_0 / q4_1 (float matrices quantized at load); default "
    "auto: gguf for a .gguf model on a CPU with kvlm's AVX2 / AVX-512 kernels, else float"
)


class CLIError(ValueError):
    """A bad input found by the command line itself; printed as `error: <message>`."""


# Bad input, as the engine reports it: each becomes `error: <message>` and exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    AdapterError,
    CLIError,
    EngineConfigError,
    InputError,
    SamplingParamsError,
    ModelNotFoundError,
    ModelLoadError,
    ModelConfigError,
    TokenizerError,
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one `error: ...` line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"alias (smollm2, gemma3-270m), a .gguf file or a HF folder (default {DEFAULT_MODEL})",
    )
    group.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and KV")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    group.add_argument(
        "--no-cache",
        action="store_true",
        help="baseline without a KV cache: recompute the whole sequence every step",
    )
    group.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: model's, ≤8192)"
    )
    group.add_argument(
        "--kv-cache-memory", default=None, help="KV pool size, e.g. 512MiB (default 1GiB)"
    )
    group.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help=f"K/V storage: {', '.join(KV_CACHE_DTYPES)} (default auto = the model's dtype)",
    )
    group.add_argument(
        "--sliding-window",
        type=int,
        default=None,
        metavar="W",
        help="attend to the last W tokens only; blocks behind the window are freed",
    )
    group.add_argument(
        "--attention-sinks",
        type=int,
        default=0,
        metavar="S",
        help="with --sliding-window: also keep the first S tokens (StreamingLLM)",
    )
    group.add_argument(
        "--weight-format",
        default=AUTO,
        choices=list(WEIGHT_FORMAT_CHOICES),
        help=WEIGHT_FORMAT_HELP,
    )
    group.add_argument(
        "--kv-offload",
        default=None,
        metavar="TIERS",
        help="keep blocks evicted from the pool in tiers and reuse them on a later prefix hit: "
        "e.g. ram:2GiB,disk:DIR:20GiB,redis://HOST:PORT (looked up in that order)",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's, one per core); use fewer than the cores "
        "when other work shares the machine",
    )
    group.add_argument(
        "--speculative-method",
        default=None,
        choices=list(SPECULATIVE_METHODS),
        help="speculative decoding: ngram drafts tokens from the prompt and output (prompt "
        "lookup), verified in one step; greedy output is unchanged",
    )
    group.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        metavar="K",
        help="with --speculative-method: drafts per step at most (default 4)",
    )


def add_prefix_adapter_option(parser: argparse.ArgumentParser, applies: str) -> None:
    parser.add_argument(
        "--prefix-adapter",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="load the PEFT prefix-tuning adapter saved in folder PATH as NAME (its K/V is "
        f"computed once and pinned in the cache); {applies}",
    )


def prefix_adapters(args: argparse.Namespace) -> dict[str, str]:
    """{name: folder} from the repeated --prefix-adapter NAME=PATH options."""
    adapters: dict[str, str] = {}
    for item in getattr(args, "prefix_adapter", None) or []:
        name, equals, path = item.partition("=")
        if not (equals and name and path):
            raise CLIError(f"--prefix-adapter {item!r}: write NAME=PATH, e.g. poet=./poet-adapter")
        if name in adapters:
            raise CLIError(f"--prefix-adapter {name!r} is given twice")
        adapters[name] = path
    return adapters


def the_prefix_adapter(args: argparse.Namespace) -> str | None:
    """The one adapter generate and chat apply (its name), if any."""
    names = list(prefix_adapters(args))
    if len(names) > 1:
        raise CLIError(
            f"{len(names)} --prefix-adapter options: generate and chat apply one adapter "
            "(kvlm serve loads several, and each request picks one)"
        )
    return names[0] if names else None


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate ({max_tokens})"
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"0 = greedy (default {DEFAULT_TEMPERATURE})",
    )
    group.add_argument(
        "--top-p", type=float, default=DEFAULT_TOP_P, help=f"nucleus mass ({DEFAULT_TOP_P})"
    )
    group.add_argument("--top-k", type=int, default=0, help="keep the k likeliest; 0 = off")
    group.add_argument("--min-p", type=float, default=0.0, help="drop below min_p × best (0)")
    group.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="1.0 = off (HF / vLLM rule)"
    )
    group.add_argument("--seed", type=int, default=None, help="seed this request's sampler")
    group.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="S",
        help="stop when the text contains S (repeatable)",
    )
    group.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence"
    )


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The request's SamplingParams; raises SamplingParamsError on a value out of range."""
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "use_cache": not args.no_cache,
        "max_model_len": args.max_model_len,
        "num_threads": args.threads,
        "kv_cache_dtype": args.kv_cache_dtype,
        "sliding_window": args.sliding_window,
        "attention_sinks": args.attention_sinks,
        "weight_format": args.weight_format,
        "kv_offload": args.kv_offload,
        "prefix_adapters": prefix_adapters(args),
    }
    if args.kv_cache_memory is not None:
        kwargs["kv_cache_memory"] = args.kv_cache_memory
    if args.speculative_method is not None:
        speculative: dict[str, Any] = {"method": args.speculative_method}
        if args.num_speculative_tokens is not None:
            speculative["num_tokens"] = args.num_speculative_tokens
        kwargs["speculative"] = speculative
    elif args.num_speculative_tokens is not None:
        raise CLIError("--num-speculative-tokens needs --speculative-method (e.g. ngram)")
    return kwargs


def check_engine_options(args: argparse.Namespace) -> None:
    """Validate the engine settings without loading anything."""
    EngineConfig(**engine_kwargs(args))


def load_llm(args: argparse.Namespace) -> LLM:
    """Load the model named by the options; a bad setting becomes a CLIError."""
    check_engine_options(args)
    return LLM(**engine_kwargs(args))


def stream_to_stdout(
    llm: LLM, prompt: dict[str, Any], params: SamplingParams, prefix_adapter: str | None = None
) -> RequestOutput:
    """Write each new piece of text as it is produced; returns the whole finished output."""
    accumulated = OutputAccumulator()
    for delta in llm.stream(prompt, params, prefix_adapter):
        sys.stdout.write(delta.outputs[0].text)
        sys.stdout.flush()
        accumulated.add(delta)
    sys.stdout.write("\n")
    sys.stdout.flush()
    final = accumulated.build()
    assert final.finished, "the stream ends with a finished output"
    return final
