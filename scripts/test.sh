#!/usr/bin/env bash
# Set everything up, then run the test suite (extra arguments go to pytest).
#
#   bash scripts/test.sh                  every test (what CI runs: .ci/run)
#   bash scripts/test.sh --fast           the unit tier: no test marked slow, services or external
#   bash scripts/test.sh --fast tests/maths -x    a tier and pytest's own arguments together
#
# The markers (pyproject.toml): slow (whole flows, `dvc repro`, many families end to end),
# services (starts mlflow, moto S3, Prefect or Dask servers), external (real built-in models,
# a llama.cpp build). The 25 slowest tests are listed at the end of every run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    args+=(-m "not slow and not services and not external")
  else
    args+=("$arg")
  fi
done
exec .venv/bin/python -m pytest -q --durations=25 ${args[@]+"${args[@]}"}
