#!/usr/bin/env bash
# The main job: set everything up, then run the full SEAP pipeline (Prefect flow `seap_pipeline`)
# on the embedded default: SmolLM2-135M-Instruct and the built-in starter suite, at 20% and 50%,
# SEAP experts and general mask, Wanda-sp and FLAP, router and routed evaluation, speed bench,
# and registration of every expert: a local registry folder plus an MLflow run and one model
# version per expert (sqlite in runs/mlflow, or the server in MLFLOW_TRACKING_URI). Every
# job is cached on its inputs: a second run takes seconds. No Prefect server is needed (a
# temporary one is started); set PREFECT_API_URL to report to yours. The defaults are those of
# the run configuration (seap/run/config.py); extra arguments go to the flow
# (`python -m flows.pipeline --help`). The console shows one progress line and the summary;
# library output goes to runs/logs/pipeline-<time>.log (`--verbose` shows it instead).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}"
export PREFECT_LOGGING_LEVEL="${PREFECT_LOGGING_LEVEL:-INFO}"
# Prefect's cache records live beside the stage outputs (runs/work), so both move together
export PREFECT_LOCAL_STORAGE_PATH="${PREFECT_LOCAL_STORAGE_PATH:-$PWD/runs/prefect-results}"
exec .venv/bin/python -m flows.pipeline "$@"
