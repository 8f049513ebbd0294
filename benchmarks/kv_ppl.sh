#!/usr/bin/env bash
# Perplexity through the cache for every KV format and for windows with and without sinks.
# Usage: bash benchmarks/kv_ppl.sh [OUT.jsonl]   (one `kvlm eval ppl --json` result a line)
set -euo pipefail
out="${1:-benchmarks/kv-ppl.jsonl}"
: > "$out"
# fp32 weights, as the committed figures (weight_format "auto" would pick gguf kernels on the CPU)
run() { kvlm eval ppl --json --weight-format float "$@" 2>/dev/null | tail -1 >> "$out"; tail -1 "$out"; }
for model in smollm2 gemma3-270m; do
  for fmt in float32 bfloat16 float16 int8 int4 fp8; do
    run --model "$model" --kv-cache-dtype "$fmt" --max-tokens 4096
  done
done
# Windows on SmolLM2: 8,192 tokens (its whole context) with a 512-token window, without and
# with 4 sinks, beside the full cache; then 12,288 tokens (past the context) with sinks.
run --model smollm2 --max-tokens 8192
run --model smollm2 --max-tokens 8192 --sliding-window 512
run --model smollm2 --max-tokens 8192 --sliding-window 512 --attention-sinks 4
run --model smollm2 --max-tokens 12288 --sliding-window 512 --attention-sinks 4
