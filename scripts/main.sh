#!/usr/bin/env bash
# The main job: set everything up, then prune the embedded default model (SmolLM2-135M-Instruct)
# to 50% with the general SEAP mask of the built-in starter calibration suite, and print the summary.
#   SEAP_SPARSITY   target sparsity (default 0.5)
#   SEAP_OUT        output folder (default runs/smollm2-135m-seap-general)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/seap prune --model smollm2-135m --calib builtin \
  --sparsity "${SEAP_SPARSITY:-0.5}" --out "${SEAP_OUT:-runs/smollm2-135m-seap-general}" --overwrite
