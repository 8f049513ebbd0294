"""Restore vs recompute: the next turn of a long conversation after a restart.

Builds a chat conversation of about --tokens tokens (a plain prompt and its completion for a
model without a chat template, e.g. gemma3-270m's GGUF), computes it (`prefill_s`), names the
cache's K/V (`identity_s`: the model file hashed, once per engine), saves it as a session file
(`save_s`: the blocks are in the cache, so this is copying them out and writing the file;
`save_export_s` is the part on the engine thread), then (each repeat starting from an empty
prefix cache, as a restarted process would) times
  recompute: the next turn's time to first token when the whole conversation is prefilled;
  restore:   reading and checking the session file and copying its blocks into the cache,
             plus the next turn's time to first token (a prefix hit).
Prints one JSON line (medians over --repeats) and a Markdown row.

    python benchmarks/session_restore.py --model smollm2 --tokens 4000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kvlm import LLM
from kvlm.engine import session as sessions
from kvlm.sampling import SamplingParams

FILLER = (
    "The survey team walked the river from the old mill to the estuary, noting every bridge, "
    "weir and ford, the depth at each and the state of the banks after the winter floods. "
)


def build_conversation(llm: LLM, num_tokens: int) -> tuple[Any, list[int]]:
    """(what `save_session` takes, the next turn's prompt ids): alternating chat turns of
    filler text, or for a model without a chat template a plain prompt and its completion."""
    question = "Summarise the survey in one sentence."
    if llm.tokenizer.chat_template is not None:
        messages: list[dict[str, str]] = []
        while not messages or len(llm.tokenizer.encode_chat(messages, False)) < num_tokens:
            role = "user" if len(messages) % 2 == 0 else "assistant"
            messages.append({"role": role, "content": f"Part {len(messages)}. " + FILLER * 3})
        next_turn = [*messages, {"role": "user", "content": question}]
        return messages, llm.tokenizer.encode_chat(next_turn)
    text = FILLER * (num_tokens // 20)
    prompt = llm.tokenizer.encode(text)[:num_tokens]
    first = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))[0]
    tail = llm.tokenizer.encode(f" {question}", add_special_tokens=False)
    return first, [*prompt, *first.outputs[0].token_ids, *tail]


def next_turn_ttft(llm: LLM, prompt_ids: list[int]) -> tuple[float, int]:
    params = SamplingParams(max_tokens=1, temperature=0)
    out = llm.generate({"prompt_token_ids": prompt_ids}, params)[0]
    return out.metrics.ttft_s, out.metrics.num_cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=4000, help="conversation length (4000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache-dtype", default="auto")
    args = parser.parse_args()

    llm = LLM(
        args.model,
        num_threads=args.threads,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.tokens + 256,
    )
    conversation, next_prompt = build_conversation(llm, args.tokens)
    cache = llm.engine.kv_cache
    token_ids, _ = sessions.session_tokens(llm.tokenizer, conversation)
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": token_ids}, SamplingParams(max_tokens=1))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    assert llm.engine.cache_identity is not None  # hashes the model file, once per engine
    identity_s = time.perf_counter() - start
    start = time.perf_counter()
    sessions.export(llm.engine, token_ids, None)  # what the engine thread does of a save
    save_export_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conversation.kvs"
        start = time.perf_counter()
        saved = llm.save_session(conversation, path)
        save_s = time.perf_counter() - start
        recompute, restore, restored_ttft, cached = [], [], [], 0
        for _ in range(args.repeats):
            cache.reset_prefix_cache()
            ttft, hit = next_turn_ttft(llm, next_prompt)
            assert hit == 0, "the recompute run found cached blocks"
            recompute.append(ttft)
            cache.reset_prefix_cache()
            start = time.perf_counter()
            session = llm.load_session(path)
            load_s = time.perf_counter() - start
            assert session.refused is None, session.refused
            ttft, cached = next_turn_ttft(llm, next_prompt)
            restore.append(load_s + ttft)
            restored_ttft.append(ttft)
        file_bytes = path.stat().st_size
    result = {
        "model": args.model,
        "kv_format": llm.engine.kv_specs[0].kv_format,
        "next_turn_tokens": len(next_prompt),
        "saved_tokens": saved,
        "cached_tokens_after_restore": cached,
        "file_bytes": file_bytes,
        "prefill_s": prefill_s,
        "identity_s": identity_s,
        "save_s": save_s,
        "save_mb_s": file_bytes / save_s / 1e6,
        "save_export_s": save_export_s,
        "recompute_ttft_s": statistics.median(recompute),
        "restore_total_s": statistics.median(restore),
        "restore_ttft_s": statistics.median(restored_ttft),
    }
    result["speedup"] = result["recompute_ttft_s"] / result["restore_total_s"]
    print(json.dumps(result))
    print(
        f"| {args.model} | {result['kv_format']} | {result['next_turn_tokens']:,} | "
        f"{file_bytes / 2**20:.1f} MiB | {result['recompute_ttft_s'] * 1e3:.0f} ms | "
        f"{result['restore_total_s'] * 1e3:.0f} ms | {result['speedup']:.1f}x |"
    )


if __name__ == "__main__":
    main()
