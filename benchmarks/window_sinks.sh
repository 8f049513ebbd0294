#!/bin/bash
# Usage: bash benchmarks/window_sinks.sh   (kvlm installed; prints model, depth, cache, decode tok/s)
# window 1024 + 4 sinks vs default cache, kvlm bench decode, 64 new tokens, median of 2, interleaved
for model in smollm2 gemma3-270m; do
  for depth in 512 4096; do
    for cache in "" "--sliding-window 1024 --attention-sinks 4"; do
      out=$(mktemp --suffix=.json)
      kvlm bench decode --model $model --threads 2 --baselines '' --new-tokens 64 --repeats 2 --prompt-tokens $depth --json $out $cache >/dev/null 2>&1
      python -c "import json,sys; r=json.load(open('$out'))['results'][0]; print('$model', $depth, '${cache:-default}', round(r['decode_tok_s'],1))"
      rm -f $out
    done
  done
done
