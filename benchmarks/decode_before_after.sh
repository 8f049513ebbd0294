#!/usr/bin/env bash
# Decode tok/s of this checkout against an older commit, alternating runs on one idle machine.
# Usage: bash benchmarks/decode_before_after.sh OLD_COMMIT [ROUNDS]
# Writes benchmarks/decode-before-after/{before,after}-ROUND.json and prints kvlm's rows.
set -euo pipefail
old="$1"; rounds="${2:-2}"
repo="$PWD"; out="$repo/benchmarks/decode-before-after"; mkdir -p "$out"
tree="$(mktemp -d)/kvlm-old"
git worktree add -q --detach "$tree" "$old"
trap 'git -C "$repo" worktree remove --force "$tree"' EXIT
for round in $(seq "$rounds"); do
  for side in before after; do
    path=$([ "$side" = before ] && echo "$tree" || echo "$repo")
    echo "== $side ($([ "$side" = before ] && echo "$old" || git rev-parse --short HEAD)), round $round"
    # PYTHONPATH puts the chosen tree's kvlm ahead of the editable install
    (cd /tmp && PYTHONPATH="$path" python -m kvlm.cli.main bench decode --new-tokens 128,512 \
      --repeats 2 --baselines "" --json "$out/$side-$round.json" 2>/dev/null | grep -E "^\| (kvlm|new)")
  done
done
