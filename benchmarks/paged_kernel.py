"""The C++ paged-attention kernel alone on one layer's decode shapes, every KV format in turns.

One decode row per sequence (batch `--batch`) after `--cached` tokens, read through a shuffled
block table from a store of one layer, as the fused decode calls the kernel. Each round times
every (block size, format) once (`--calls` calls each), so on a shared machine the ratios
between them are the figure to read; the fastest round (the least disturbed) is reported in
microseconds per call.

    python benchmarks/paged_kernel.py --heads 4 1 256 --cached 512 --threads 2
    python benchmarks/paged_kernel.py --heads 9 3 64 --cached 4096 --block-size 4 16
"""

from __future__ import annotations

import argparse
import time

import torch

from kvlm.kernels.paged import FORMAT_CODES, _isa, _ops
from kvlm.kv.spec import KVCacheSpec
from kvlm.kv.store import KVStore

FORMATS = ["float32", "float16", "bfloat16", "int8", "int4", "fp8"]


def make_store(heads: tuple[int, int, int], kv_format: str, cached: int, batch: int,
               block_size: int, window: int | None) -> tuple[KVStore, torch.Tensor]:  # fmt: skip
    """A one-layer store holding `cached` random keys/values per sequence, and its tables."""
    _, nkv, hd = heads
    spec = KVCacheSpec((0,), nkv, hd, block_size, kv_format, window, 0)
    per_seq = -(-(cached + 1) // block_size)
    store = KVStore(spec, per_seq * batch + 1, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(per_seq * batch, generator=gen) + 1  # block 0 is the null block
    tables = ids.view(batch, per_seq)
    positions = torch.arange(cached)
    for b in range(batch):
        rows = tables[b][positions // block_size] * store.rows_per_block + positions % block_size
        shape = (cached, nkv, hd)
        store.write(0, rows, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    return store, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs=3, default=[4, 1, 256],
                        metavar=("NUM_HEADS", "NUM_KV_HEADS", "HEAD_DIM"))  # fmt: skip
    parser.add_argument("--cached", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, nargs="+", default=[16])
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--path", default=None, help="kernel path (ref, avx2, avx512)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nh, _, hd = args.heads
    q = torch.randn(args.batch, nh, hd)
    starts = torch.arange(args.batch + 1)
    cached = torch.full((args.batch,), args.cached)
    op, isa = _ops().paged_attention, _isa(args.path)  # the operator alone, inputs checked once
    setups = {}
    for block_size in args.block_size:
        for name in args.formats:
            store, tables = make_store(tuple(args.heads), name, args.cached, args.batch,
                                       block_size, args.window)  # fmt: skip
            setups[block_size, name] = (store, tables)
    times: dict[tuple[int, str], list[float]] = {key: [] for key in setups}
    for _ in range(args.rounds):
        for (block_size, name), (store, tables) in setups.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                op(q, store.data, store.scales, *store.layer_offsets(0), block_size,
                   store.rows_per_block, tables, starts, cached, args.window or 0, 0, hd**-0.5, 0.0,
                   FORMAT_CODES[name], None, isa)  # fmt: skip
            times[block_size, name].append((time.perf_counter() - start) / args.calls * 1e6)
    first = next(iter(setups))
    base = min(times[first])
    print(f"heads {args.heads}, {args.cached} cached, batch {args.batch}, {args.threads} threads; "
          f"ratio = time / block {first[0]} {first[1]}'s")  # fmt: skip
    for (block_size, name), ts in times.items():
        best = min(ts)
        print(f"block {block_size:>3} {name:>9}: {best:8.1f} us/call  x{best / base:.2f}")


if __name__ == "__main__":
    main()
