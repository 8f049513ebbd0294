"""One short check a lent CUDA machine can run in one call (issue 18, item 4); it fails loudly.

1. The Triton paged attention against the torch reference on random stores: the test file
   tests/kernels/test_triton_paged.py, which compiles the kernel on CUDA where there is one.
2. SmolLM2's greedy tokens on CUDA equal the CPU's (float weights and float32 on both).
3. Decode tok/s at batch 1 and 64, kvlm beside transformers with its static cache and
   `torch.compile` (the strongest baseline there), in this process, same GGUF, same dtype.

    python benchmarks/gpu_check.py --json benchmarks/cuda/gpu-check.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvlm.bench.backends import HFBackend, KvlmBackend
from kvlm.bench.decode import prompt_ids
from kvlm.engine.llm import LLM
from kvlm.loading.registry import resolve_model_path
from kvlm.sampling.params import SamplingParams

PROMPT_TOKENS = 64
REPO = Path(__file__).resolve().parent.parent


def check_kernel() -> None:
    test = REPO / "tests" / "kernels" / "test_triton_paged.py"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", str(test)], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"the Triton kernel tests failed on CUDA (pytest exit {done.returncode})")


def check_greedy(model: str, num_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    prompt = "The KV cache of a transformer holds"
    tokens = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model, device=device, dtype="float32", weight_format="float")
        tokens[device] = list(llm.generate([prompt], params)[0].outputs[0].token_ids)
        del llm
    if tokens["cuda"] != tokens["cpu"]:
        raise SystemExit(f"greedy tokens differ: cuda {tokens['cuda']} vs cpu {tokens['cpu']}")
    return tokens["cuda"]


def _hf_compiled(model: str, dtype: str) -> HFBackend:
    hf = HFBackend(resolve_model_path(model), dtype, device="cuda")
    hf.model.generation_config.cache_implementation = "static"
    hf.model.forward = torch.compile(hf.model.forward, mode="reduce-overhead", fullgraph=True)
    return hf


def _hf_wall(hf: HFBackend, prompts: list[list[int]], num_tokens: int) -> float:
    input_ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            pad_token_id=hf.pad_token_id,
        )
    torch.cuda.synchronize()
    assert out.shape[1] - input_ids.shape[1] == num_tokens, out.shape
    return time.perf_counter() - start


def decode_rates(model: str, dtype: str, batches: list[int], num_tokens: int) -> list[dict]:
    """Decode tok/s (prefill excluded) per engine and batch, after a warm-up run of each."""
    ours = KvlmBackend(model, dtype, use_cache=True, max_num_seqs=max(batches))
    hf = _hf_compiled(model, dtype)
    rows = []
    for batch in batches:
        prompts = prompt_ids(ours.llm.tokenizer, PROMPT_TOKENS, batch)
        ours.run(prompts, 4)
        timing = ours.run(prompts, num_tokens)
        rows.append({"engine": "kvlm", "batch": batch, "decode_tok_s": timing.decode_tok_s})
        for _ in range(2):  # compile and capture the graphs for this shape
            _hf_wall(hf, prompts, num_tokens)
        # decode only: the time of num_tokens tokens less that of one (the prefill)
        seconds = _hf_wall(hf, prompts, num_tokens) - _hf_wall(hf, prompts, 1)
        rate = batch * (num_tokens - 1) / seconds
        rows.append({"engine": "hf static+compile", "batch": batch, "decode_tok_s": rate})
        print(rows[-2], rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks kvlm on a GPU")
    check_kernel()
    tokens = check_greedy(args.model, args.greedy_tokens)
    print(f"greedy tokens equal on cuda and cpu: {tokens}", flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows = decode_rates(args.model, args.dtype, batches, args.new_tokens)
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, {args.model} {args.dtype}, prompt "
          f"{PROMPT_TOKENS} tokens, {args.new_tokens} new, greedy\n")  # fmt: skip
    print("| batch | kvlm decode tok/s | transformers static+compile | ratio |")
    print("|---:|---:|---:|---:|")
    for ours, hf in zip(rows[::2], rows[1::2], strict=True):
        ratio = ours["decode_tok_s"] / hf["decode_tok_s"]
        print(f"| {ours['batch']} | {ours['decode_tok_s']:.0f} | {hf['decode_tok_s']:.0f} | "
              f"{ratio:.2f}× |")  # fmt: skip
    if args.json:
        result = {"device": device, "torch": torch.__version__, "greedy_tokens": tokens,
                  "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
