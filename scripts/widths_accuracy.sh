#!/usr/bin/env bash
# Accuracy of the width options on the embedded default (docs/results.md §6): the SEAP experts and
# general mask at 20% and 50% (logistic schedule, reconstruction on, the main job's settings), with
# kept MLP channels rounded to multiples of 1 (free widths), 32, 64 (the default) and 128, and
# with one width for all layers (--same-width). One `seap eval` per setting, sharing one work
# folder (the statistics and scores are computed once). Results: runs/widths/<setting>/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
common=(--methods seap-expert seap-general --sparsities 0.2 0.5 --no-bench --no-mlflow --no-perplexity
        --workdir runs/widths/work --registry-dir runs/widths/registry)
for m in 1 32 64 128; do
  .venv/bin/seap eval "${common[@]}" --channel-multiple "$m" --out "runs/widths/multiple-$m"
done
.venv/bin/seap eval "${common[@]}" --same-width --out runs/widths/same-width
