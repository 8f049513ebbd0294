#!/usr/bin/env bash
# KV waste and serving speed by block size, one `kvlm bench serve` per size on one idle machine.
# Usage: bash benchmarks/block_size.sh [SIZES]   (default "8 16 32"; JSON to benchmarks/)
set -euo pipefail
for size in ${1:-8 16 32}; do
  kvlm bench serve --block-size "$size" --json "benchmarks/serve-block-$size.json" 2>/dev/null \
    | grep -E "^\| (1|4|16) |KV waste|Blocks of"
done
