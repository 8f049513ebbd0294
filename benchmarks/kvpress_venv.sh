#!/usr/bin/env bash
# A virtual environment for NVIDIA's kvpress, apart from kvlm's own: kvpress 0.5.5 requires
# transformers < 5.3, and the main environment's transformers (the test oracle) stays as it is.
# torch is pinned to the exact CPU build this machine's wheel folder holds: a looser pin would
# pull the CUDA build and its libraries. gguf lets transformers read the GGUF files kvlm runs.
# Usage: bash benchmarks/kvpress_venv.sh [VENV]   (default ~/.cache/kvlm/kvpress-venv)
# Then:  VENV/bin/python benchmarks/kvpress_anchor.py --help
set -euo pipefail
venv="${1:-$HOME/.cache/kvlm/kvpress-venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet "kvpress==0.5.5" "transformers>=4.56,<5.3" gguf
"$venv/bin/python" -c "import kvpress, torch, transformers; print('kvpress venv:', torch.__version__, 'transformers', transformers.__version__)"
