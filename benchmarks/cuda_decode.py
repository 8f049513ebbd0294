"""Decode on a CUDA device: kvlm (cache and no-cache) beside transformers on the same GGUF.

`kvlm bench decode` times transformers on the CPU; this script puts both engines on the GPU, in
one process, so their ratio is honest on a lent machine. For each dtype, batch size and length N
it generates exactly N greedy tokens (EOS ignored) from fixed prompts and prints one markdown
table; --json writes the raw numbers with the device's name.

    python benchmarks/cuda_decode.py --model smollm2 --new-tokens 128,512 --batch-sizes 1,16
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from kvlm.bench.backends import Backend, HFBackend, KvlmBackend
from kvlm.bench.decode import prompt_ids
from kvlm.loading.registry import resolve_model_path

PROMPT_TOKENS = 64


def _time(backend: Backend, prompts: list[list[int]], n: int, repeats: int) -> dict:
    backend.run(prompts, 4)  # warm-up: kernels chosen, caches allocated
    runs = [backend.run(prompts, n) for _ in range(repeats)]
    return {
        "engine": backend.name,
        "batch": len(prompts),
        "new_tokens": n,
        "wall_s": statistics.median(r.wall_s for r in runs),
        "tok_s": statistics.median(r.num_generated_tokens / r.wall_s for r in runs),
        "decode_tok_s": statistics.median(r.decode_tok_s or 0.0 for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", default="128,512")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--no-cache-tokens", type=int, default=128, help="0 to skip")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script compares engines on a GPU")
    lengths = [int(x) for x in args.new_tokens.split(",")]
    batches = [int(x) for x in args.batch_sizes.split(",")]
    rows: list[dict] = []
    for dtype in args.dtypes.split(","):
        ours = KvlmBackend(args.model, dtype, use_cache=True, max_num_seqs=max(batches))
        hf = HFBackend(resolve_model_path(args.model), dtype, device="cuda")
        for batch in batches:
            prompts = prompt_ids(ours.llm.tokenizer, PROMPT_TOKENS, batch)
            for n in lengths:
                for backend in (ours, hf):
                    rows.append({"dtype": dtype, **_time(backend, prompts, n, args.repeats)})
                    print(rows[-1], flush=True)
        if args.no_cache_tokens:
            recompute = KvlmBackend(args.model, dtype, use_cache=False, max_num_seqs=1)
            prompts = prompt_ids(ours.llm.tokenizer, PROMPT_TOKENS, 1)
            rows.append({"dtype": dtype, **_time(recompute, prompts, args.no_cache_tokens, 1)})
            print(rows[-1], flush=True)
        del ours, hf
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, prompt {PROMPT_TOKENS} tokens, greedy\n")
    print("| dtype | batch | new tokens | engine | tok/s (all) | decode tok/s | vs hf |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        base = next(
            (
                b
                for b in rows
                if b["engine"] == "hf"
                and (b["dtype"], b["batch"], b["new_tokens"])
                == (r["dtype"], r["batch"], r["new_tokens"])
            ),
            None,
        )
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}×" if base else "–"
        print(
            f"| {r['dtype']} | {r['batch']} | {r['new_tokens']} | {r['engine']} | "
            f"{r['tok_s']:.1f} | {r['decode_tok_s']:.1f} | {ratio} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
