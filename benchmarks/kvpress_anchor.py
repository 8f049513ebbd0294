"""kvpress's presses on the same GGUF, the same long-context task and the same perplexity as
`kvlm eval longctx` / `kvlm eval ppl --kv-press`: the anchor kvlm's presses are compared with.

Runs in kvpress's own virtual environment (`bash benchmarks/kvpress_venv.sh`; kvpress 0.5.5
needs transformers < 5.3) and imports kvlm's stdlib-only task modules by path, not kvlm itself:

    VENV=~/.cache/kvlm/kvpress-venv
    GGUF=$(python -c "from kvlm.loading import resolve_model_path as r; print(r('smollm2'))")
    $VENV/bin/python benchmarks/kvpress_anchor.py --model "$GGUF" --kv-press snapkv:0.5

`--tokenizer-json FILE` tokenizes with the `tokenizers` pipeline kvlm builds for the GGUF
(`Tokenizer.from_gguf(path).to_json()`, written from kvlm's environment) instead of
transformers' GGUF tokenizer, so both sides read the same ids. Gemma 3 needs it: transformers
5.2 converts its GGUF vocabulary into a tokenizer that adds no BOS and splits words otherwise
("Hello world" -> [9259, 515, 504, 671]; kvlm and Gemma: [2, 9259, 1902]), which puts the
plain perplexity at 80 where kvlm's is 4.3 (640-token context, 128 scored).

One JSON line per press and task, with the keys `kvlm eval longctx --json` and `kvlm eval ppl
--json` print (plus "backend": "kvpress"). The weights are dequantized to float32 by
transformers, so compare with kvlm's `--weight-format float`.

What "after the press" means, on both sides: the prompt is prefilled in one pass with every
token attending to the whole prompt (its window, in a sliding layer); the press compresses its
cache (kvpress's forward hooks, run after each attention layer's prefill); the continuation is
then fed reading the compressed cache at its true positions (position ids continue from the
prompt's length, as kvpress's pipeline does). The continuation's first token is scored from
the prompt's last logits.

Gemma 3 (`--model` the gemma3-270m GGUF): kvpress presses only the layers without a sliding
window (kvpress 0.5.5, `BasePress.__call__`: "Compression in Gemma3 is only applied to layer
without sliding window attention"), and so does kvlm; but kvpress tests for
Gemma3ForConditionalGeneration, while this GGUF loads as the text-only Gemma3ForCausalLM, on
which kvpress would hook every layer. `press_context` registers the press's own forward hook on
the global layers only, as kvpress does for Gemma 3, with each layer's rope bound to its layer
type (Gemma 3's rotary embedding takes one; expected attention calls it without). Once the
global layers hold fewer tokens than the sliding ones count, a forward of several tokens gets a
wrong causal mask (transformers takes cache positions from layer 0, a sliding one, so the
global layers' queries see the continuation's later tokens: knorm:0.5 after 640 tokens scored
a perplexity of 1.53 that way, 7.06 token by token, as kvlm): such a continuation is fed one
token at a time, which needs no mask. A sliding layer's cache is put back after each
continuation with its token count, not cut (it has rolled its window).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType, SimpleNamespace

import tokenizers
import torch
from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

BENCH = Path(__file__).resolve().parent.parent / "kvlm" / "bench"
METHODS = ("knorm", "streaming_llm", "snapkv", "expected_attention")
RATIOS = (0.25, 0.5, 0.75)


def load_by_path(name: str) -> ModuleType:
    """kvlm/bench/NAME.py, stdlib only, without importing the kvlm package (torch, kernels)."""
    spec = importlib.util.spec_from_file_location(f"kvlm_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


haystack = load_by_path("haystack")
press_spec = load_by_path("press_spec")


def kvpress_press(spec: press_spec.PressSpec) -> object:
    """kvpress's press of the same method: ratio = compression_ratio; window = SnapKV's
    window_size; num_sinks = n_sink (StreamingLLM, expected attention); num_future_positions =
    n_future_positions (expected attention). Unset options keep kvpress's defaults, which
    kvlm's KVPress shares (window 64, 4 sinks, 512 future positions). kvpress's expected
    attention takes the statistics of every prompt query after the sinks: compare it with
    kvlm's expected_attention given a window at least as long as the context."""
    options = dict(spec.options)
    renames = {
        "knorm": (KnormPress, {}),
        "streaming_llm": (StreamingLLMPress, {"num_sinks": "n_sink"}),
        "snapkv": (SnapKVPress, {"window": "window_size"}),
        "expected_attention": (
            ExpectedAttentionPress,
            {"num_sinks": "n_sink", "num_future_positions": "n_future_positions"},
        ),
    }
    if spec.method not in renames:
        raise SystemExit(
            f"error: no kvpress press for {spec.method!r}; choose {', '.join(METHODS)}"
        )
    cls, names = renames[spec.method]
    unknown = set(options) - set(names)
    if unknown:
        raise SystemExit(f"error: {spec.method} takes no option {', '.join(sorted(unknown))}")
    if spec.ratio is None:
        raise SystemExit(f"error: --kv-press {spec.label}: write {spec.method}:RATIO")
    return cls(compression_ratio=spec.ratio, **{names[k]: v for k, v in options.items()})


class JsonTokenizer:
    """A tokenizer.json pipeline (`--tokenizer-json`), called as transformers' tokenizers are."""

    def __init__(self, path: Path) -> None:
        self.backend = tokenizers.Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return SimpleNamespace(input_ids=encoding.ids)


@contextmanager
def press_context(press: object, model: AutoModelForCausalLM) -> Iterator[None]:
    """`press(model)`, kvpress's hooks on every attention layer; on a model with sliding layers
    (Gemma 3) the same hook on the global layers only (see the module docstring)."""
    decoder = model.model.language_model if hasattr(model.model, "language_model") else model.model
    layers = [layer.self_attn for layer in decoder.layers]
    if not any(getattr(attn, "is_sliding", False) for attn in layers):
        with press(model):  # type: ignore[operator]
            yield
        return
    press.post_init_from_model(model)  # type: ignore[attr-defined]
    hooks = []
    try:
        for attn in layers:
            if attn.is_sliding:
                continue
            attn.rotary_emb = functools.partial(decoder.rotary_emb, layer_type=attn.layer_type)
            hooks.append(attn.register_forward_hook(press.forward_hook, with_kwargs=True))  # type: ignore[attr-defined]
        yield
    finally:
        for hook in hooks:
            hook.remove()


class Scorer:
    """One model; a prompt pressed once, then continuations read through its cache."""

    def __init__(self, model: AutoModelForCausalLM) -> None:
        self.model = model

    @torch.inference_mode()
    def press_prompt(
        self, prompt_ids: list[int], press: object | None
    ) -> tuple[DynamicCache, torch.Tensor]:
        """The prompt's pressed cache and its last row of logits [vocab] (pre-press attention)."""
        cache = DynamicCache(config=self.model.config)
        with press_context(press, self.model) if press is not None else nullcontext():
            out = self.model(
                input_ids=torch.tensor([prompt_ids]), past_key_values=cache, logits_to_keep=1
            )
        return cache, out.logits[0, -1].float()

    @torch.inference_mode()
    def continuation(
        self, cache: DynamicCache, last_logits: torch.Tensor, num_prompt: int, ids: list[int]
    ) -> tuple[list[float], list[int]]:
        """log p and rank of each continuation token; the cache is left as it was."""
        saved = [
            (layer.keys, layer.values, vars(layer).get("cumulative_length"))
            for layer in cache.layers
        ]
        positions = torch.arange(num_prompt, num_prompt + len(ids)).unsqueeze(0)
        # the layers disagree on the cache's length: one token at a time (module docstring)
        one_by_one = len({layer.get_seq_length() for layer in cache.layers}) > 1
        chunks = [slice(i, i + 1) for i in range(len(ids))] if one_by_one else [slice(None)]
        rows = []
        for chunk in chunks:
            out = self.model(
                input_ids=torch.tensor([ids[chunk]]),
                past_key_values=cache,
                position_ids=positions[:, chunk],
            )
            rows.append(out.logits[0].float())
        for layer, (keys, values, cumulative) in zip(cache.layers, saved, strict=True):
            layer.keys, layer.values = keys, values  # the continuation dropped
            if cumulative is not None:  # a sliding layer counts every token it has seen
                layer.cumulative_length = cumulative
        # [len(ids), vocab]
        logits = torch.cat([last_logits[None], torch.cat(rows)[:-1]])
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids)
        chosen = logprobs.gather(1, target[:, None])[:, 0]  # [len(ids)]
        ranks = 1 + (logprobs > chosen[:, None]).sum(dim=1)  # 1 + strictly likelier, as kvlm
        return chosen.tolist(), ranks.tolist()


def run_longctx(
    scorer: Scorer, tokenizer: object, args: argparse.Namespace, spec: object | None
) -> dict:
    config = haystack.HaystackConfig(args.context_tokens, args.num_facts, args.seed)
    bos = tokenizer("", add_special_tokens=True).input_ids  # type: ignore[operator]
    tokenize = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731  # type: ignore[operator]
    task = haystack.make_task(config, tokenize, bos)
    press = None if spec is None else kvpress_press(spec)
    answers = []
    pressed: tuple[DynamicCache, torch.Tensor] | None = None  # one context for every question
    for placed in task.facts:
        prompt, continuation = haystack.scoring_split(task, placed, args.question_aware)
        if pressed is None or args.question_aware:
            pressed = scorer.press_prompt(prompt, press)
        logprobs, ranks = scorer.continuation(*pressed, len(prompt), continuation)
        n = len(placed.answer_ids)  # the answer ends the continuation
        # greedy decoding gives the answer iff each answer token ranks first after the ones
        # before it: one teacher-forced pass tells
        answers.append(haystack.AnswerScore(logprobs[-n:], all(r == 1 for r in ranks[-n:])))
    return {
        **haystack.score_task(task, answers),
        "question_aware": args.question_aware,
    }


def run_ppl(
    scorer: Scorer, tokenizer: object, args: argparse.Namespace, spec: object | None
) -> dict:
    text = haystack.reference_text()[: args.max_tokens * haystack.CHARS_PER_TOKEN_BOUND]
    ids = tokenizer(text, add_special_tokens=True).input_ids[: args.max_tokens]  # type: ignore[operator]
    prompt, continuation = ids[: args.ppl_context_tokens], ids[args.ppl_context_tokens :]
    press = None if spec is None else kvpress_press(spec)
    logprobs, _ = scorer.continuation(
        *scorer.press_prompt(prompt, press), len(prompt), continuation
    )
    return {
        "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
        "num_tokens": len(ids),
        "context_tokens": len(prompt),
        "scored_tokens": len(continuation),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a .gguf file")
    parser.add_argument(
        "--tokenizer-json",
        type=Path,
        default=None,
        help="tokenize with this tokenizer.json (kvlm's pipeline for the GGUF; needed for "
        "Gemma 3) instead of transformers' GGUF tokenizer",
    )
    parser.add_argument(
        "--kv-press",
        action="append",
        default=None,
        metavar="METHOD:RATIO[,NAME=INT]",
        help="a press to run (repeatable); 'none' is the plain cache; default: the plain cache, "
        f"then {', '.join(METHODS)} at ratios {', '.join(map(str, RATIOS))}",
    )
    parser.add_argument("--task", choices=("longctx", "ppl", "both"), default="both")
    parser.add_argument("--context-tokens", type=int, default=4096, help="longctx haystack size")
    parser.add_argument("--num-facts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--question-aware", action="store_true", help="the question ends the pressed prompt"
    )
    parser.add_argument("--max-tokens", type=int, default=4096, help="ppl: tokens of the text")
    parser.add_argument(
        "--ppl-context-tokens", type=int, default=2048, help="ppl: the pressed prefix"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not 0 < args.ppl_context_tokens < args.max_tokens - 1:
        parser.error("--ppl-context-tokens must be in (0, --max-tokens - 1)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    labels = args.kv_press or ["none"] + [f"{m}:{r}" for m in METHODS for r in RATIOS]
    specs = [None if label == "none" else press_spec.parse_press(label) for label in labels]
    for spec in specs:
        if spec is not None:
            kvpress_press(spec)  # a bad value fails before the model loads
    hf_logging.disable_progress_bar()  # the GGUF load draws two bars of 272 steps
    folder, name = str(args.model.parent), args.model.name
    if args.tokenizer_json is not None:
        tokenizer: object = JsonTokenizer(args.tokenizer_json)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    scorer = Scorer(model)
    tasks = {"longctx": run_longctx, "ppl": run_ppl}
    for spec in specs:
        for task_name, run in tasks.items():
            if args.task not in (task_name, "both"):
                continue
            result = run(scorer, tokenizer, args, spec)
            result.update(
                task=task_name,
                backend="kvpress",
                model=str(args.model),
                tokenizer=str(args.tokenizer_json or "transformers (GGUF)"),
                weight_format="float",
                kv_cache_dtype="float32",
                kv_press=None if spec is None else spec.label,
            )
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
