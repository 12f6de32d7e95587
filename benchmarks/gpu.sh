#!/usr/bin/env bash
# The streamed engine on one GPU: a random-weight model of Llama-3-8B's shape, seap prune at 20%
# and 50% (statistics, refit and the pruned checkpoint, one layer at a time on the GPU), then
# prefill and decode of pruned against dense in bfloat16. Under 8 minutes on an H100.
#
#   bash benchmarks/gpu.sh [OUT.json]     (set-up first if needed: bash scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-.}/gpu.json}"
if [ ! -x .venv/bin/python ]; then bash scripts/setup.sh; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec .venv/bin/python benchmarks/gpu.py --json "$OUT"
