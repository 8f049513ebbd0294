#!/usr/bin/env bash
# KV waste and in-process serving speed by block size, one `kvlm bench prefix` per size on one
# idle machine (the in-process workloads `kvlm bench serve` ran before it moved to HTTP).
# Usage: bash benchmarks/block_size.sh [SIZES]   (default "8 16 32"; JSON to benchmarks/)
set -euo pipefail
for size in ${1:-8 16 32}; do
  kvlm bench prefix --weight-format float --block-size "$size" --streams 1,4,16 --prefix-tokens 1000 \
    --json "benchmarks/serve-block-$size.json" 2>/dev/null \
    | grep -E "^\| (1|4|16|1000) |KV waste|Blocks of"
done
