"""Time the sampler's top-k / top-p / min-p filters on Gemma 3's vocabulary (262,144 logits).

Compares the candidate pre-filter (`apply_top_k_top_p_min_p`) with the full-vocabulary sort it
avoids (`_filter_sorted`), on peaked logits like a language model's, and checks they agree.

    python benchmarks/sampler_filters.py --rows 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvlm.sampling.filters import _filter_sorted, apply_top_k_top_p_min_p

VOCAB = 262_144


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logits = torch.randn(args.rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 8
    rows = args.rows
    cases = {
        "top_p=0.95": (None, torch.full((rows,), 0.95), None),
        "top_k=50, top_p=0.9": (torch.full((rows,), 50), torch.full((rows,), 0.9), None),
        "min_p=0.05": (None, None, torch.full((rows,), 0.05)),
    }
    print(f"{rows} rows × {VOCAB} logits, torch threads {torch.get_num_threads()}")
    print("| filters | pre-filter ms | full sort ms | speed-up | same result |")
    print("|---|---:|---:|---:|---|")
    for name, filt in cases.items():
        fast = _median_s(lambda f=filt: apply_top_k_top_p_min_p(logits, *f), args.repeats)
        full = _median_s(lambda f=filt: _filter_sorted(logits, *f), args.repeats)
        same = torch.equal(apply_top_k_top_p_min_p(logits, *filt), _filter_sorted(logits, *filt))
        print(f"| {name} | {fast * 1e3:.1f} | {full * 1e3:.1f} | {full / fast:.1f}× | {same} |")


if __name__ == "__main__":
    main()
