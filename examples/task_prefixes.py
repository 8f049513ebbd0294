"""Three tasks over one shared document: each task's time to first token with and without sharing.

Classification, summarisation and question answering all start with the same document (CPython's
own reference text, from `pydoc_data.topics`, cut to --doc-tokens tokens). Three runs, one engine:
  none        the prefix cache is emptied before every task: each pays the document's prefill
  cached      plain prefix caching: the first task pays it, the next two reuse its full blocks
  registered  `llm.register_prefix` computes the document once (timed on its own) and pins it;
              every task then reuses it, however full the pool gets meanwhile
Tasks run one at a time, so a TTFT is one request's prefill (its uncached tail) plus one token.
Prints a markdown table; --json writes the numbers with the settings.

    python examples/task_prefixes.py --doc-tokens 2000 --threads 2 --json task_prefixes.json
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import time

from kvlm import LLM, SamplingParams
from kvlm.tokenizer import Tokenizer

TASKS = {
    "classification": "\n\nWhich Python statement does this document describe? Answer in one word:",
    "summarisation": "\n\nSummarise the document above in one sentence:",
    "question answering": "\n\nQuestion: what happens when the condition is false? Answer:",
}
MODES = ("none", "cached", "registered")


def document(tokenizer: Tokenizer, num_tokens: int) -> str:
    """About `num_tokens` tokens of English prose from CPython's reference documentation."""
    text = ""
    for key in sorted(pydoc_data.topics.topics):
        text += pydoc_data.topics.topics[key]
        ids = tokenizer.encode(text)
        if len(ids) >= num_tokens:
            return tokenizer.decode(ids[:num_tokens], skip_special_tokens=True)
    raise SystemExit(f"pydoc's topics hold fewer than {num_tokens} tokens")


def run_task(llm: LLM, document_ids: list[int], task: str, params: SamplingParams) -> dict:
    ids = [*document_ids, *llm.tokenizer.encode(task, add_special_tokens=False)]
    out = llm.generate({"prompt_token_ids": ids}, params)[0]
    return {
        "ttft_s": out.metrics.ttft_s,
        "prompt_tokens": out.metrics.num_prompt_tokens,
        "cached_tokens": out.metrics.num_cached_tokens,
    }


def measure(llm: LLM, text: str, params: SamplingParams) -> dict:
    cache = llm.engine.kv_cache
    results: dict = {mode: {} for mode in MODES}
    document_ids = llm.tokenizer.encode(text)
    for task, prompt in TASKS.items():
        cache.reset_prefix_cache()
        results["none"][task] = run_task(llm, document_ids, prompt, params)
    cache.reset_prefix_cache()
    for task, prompt in TASKS.items():
        results["cached"][task] = run_task(llm, document_ids, prompt, params)
    cache.reset_prefix_cache()
    start = time.perf_counter()
    prefix = llm.register_prefix("document", text)
    results["register_s"] = time.perf_counter() - start
    for task, prompt in TASKS.items():
        results["registered"][task] = run_task(llm, list(prefix.token_ids), prompt, params)
    llm.unregister_prefix("document")
    results["document_tokens"] = len(document_ids)
    return results


def table(results: dict) -> str:
    rows = [
        "| task | TTFT, no sharing | TTFT, prefix cache | TTFT, registered prefix "
        "| cached tokens (cache / registered) |",
        "|---|---:|---:|---:|---:|",
    ]
    totals = dict.fromkeys(MODES, 0.0)
    for task in TASKS:
        runs = {mode: results[mode][task] for mode in MODES}
        for mode in MODES:
            totals[mode] += runs[mode]["ttft_s"]
        ttfts = " | ".join(f"{runs[m]['ttft_s'] * 1e3:,.0f} ms" for m in MODES)
        cached = f"{runs['cached']['cached_tokens']:,} / {runs['registered']['cached_tokens']:,}"
        rows.append(f"| {task} | {ttfts} | {cached} |")
    total = " | ".join(f"**{totals[m] * 1e3:,.0f} ms**" for m in MODES)
    rows.append(f"| all three | {total} | |")
    rows.append(
        f"\nDocument: {results['document_tokens']:,} tokens; registering it (its prefill, "
        f"once) took {results['register_s'] * 1e3:,.0f} ms."
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--doc-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens each task generates")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.doc_tokens < 16:
        parser.error(f"--doc-tokens must be at least one block (16), got {args.doc_tokens}")
    llm = LLM(args.model, num_threads=args.threads, max_model_len=args.doc_tokens + 256)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    llm.generate("Warm-up: the kernels and the pool get ready.", params)
    results = measure(llm, document(llm.tokenizer, args.doc_tokens), params)
    print(f"{args.model}, {args.threads or 'default'} threads\n")
    print(table(results))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
