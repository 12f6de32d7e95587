#!/usr/bin/env bash
# Register the SEAP deployments (prefect.yaml) on a Prefect server and start a process worker.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api bash infra/local/prefect-deploy.sh
#
# Without PREFECT_API_URL it starts a local `prefect server` (state in $PREFECT_HOME, default
# ~/.prefect) on 127.0.0.1:4200 first. Ctrl-C stops the worker (and the server it started).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh >&2
PREFECT=".venv/bin/prefect"
server_pid=""
if [[ -z "${PREFECT_API_URL:-}" ]]; then
  export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT:-4200}/api"
  "$PREFECT" server start --host 127.0.0.1 --port "${PREFECT_PORT:-4200}" > "${TMPDIR:-/tmp}/seap-prefect-server.log" 2>&1 &
  server_pid=$!
  trap '[[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    curl -fs "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -fs "$PREFECT_API_URL/health" >/dev/null || { echo "prefect server did not start; see ${TMPDIR:-/tmp}/seap-prefect-server.log" >&2; exit 1; }
  echo "Prefect server: ${PREFECT_API_URL%/api}"
fi
"$PREFECT" work-pool create seap-process --type process --overwrite
"$PREFECT" --no-prompt deploy --all
echo "deployments registered; the weekly one runs every Monday 03:00 UTC."
echo "run one now: $PREFECT deployment run 'seap-pipeline/weekly'"
exec "$PREFECT" worker start --pool seap-process
