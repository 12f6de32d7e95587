#!/usr/bin/env bash
# Start the SEAP team services on one machine, without containers: the MLflow tracking server
# (mlflow/server/serve.sh, artifacts on S3) and a Prefect server, optionally a process worker.
#
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...        # S3 credentials (secrets)
#   export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000            # MinIO you run; unset = AWS S3
#   bash infra/single-machine/start.sh [--with-worker]
#   bash infra/single-machine/stop.sh
#
# What it does (idempotent: a service whose pid is alive and whose /health answers is left alone):
#   1. creates the S3 buckets (infra/create_buckets.py: the MLflow artifacts bucket and SEAP_DVC_BUCKET);
#   2. starts mlflow/server/serve.sh and `prefect server start` in the background, each in its own
#      process group (pid files and logs in $SEAP_INFRA_DIR), and waits for both /health endpoints;
#   3. with --with-worker: creates the process work pool seap-process, registers the deployments of
#      prefect.yaml (`prefect --no-prompt deploy --all`) and starts `prefect worker start --pool seap-process`;
#   4. prints the URLs and the `export MLFLOW_TRACKING_URI=... PREFECT_API_URL=...` line for clients
#      (also written to $SEAP_INFRA_DIR/env.sh, which holds no secrets).
#
# Environment (defaults in brackets; see infra/README.md for the full table):
#   SEAP_INFRA_DIR                 state: logs, pid files, mlflow.db, PREFECT_HOME [$PWD/runs/infra, repo root]
#   MLFLOW_HOST / MLFLOW_PORT      [127.0.0.1 / 5000]     PREFECT_HOST / PREFECT_PORT  [127.0.0.1 / 4200]
#   MLFLOW_BACKEND_STORE_URI       [sqlite:///$SEAP_INFRA_DIR/mlflow.db]
#   MLFLOW_ARTIFACTS_DESTINATION   [s3://${SEAP_MLFLOW_BUCKET:-seap-mlflow}/artifacts]
#   SEAP_DVC_BUCKET                [seap-dvc]            SEAP_CREATE_BUCKETS=0 skips step 1
#   MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION  (see serve.sh)
#   SEAP_INFRA_TIMEOUT             seconds to wait for the servers' health [180]
#
# Tools: .venv/bin/{python,mlflow,prefect} of this repository when present, else the ones on PATH.
# Credentials come from the environment only; nothing here prints or writes them (the Prefect
# server is started without them; only the MLflow server, which writes to S3, gets them).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"

die() { echo "start.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

with_worker=0
for arg in "$@"; do
  case "$arg" in
    --with-worker) with_worker=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$arg' (usage: bash infra/single-machine/start.sh [--with-worker])" ;;
  esac
done

tool() {  # tool NAME -> absolute path of .venv/bin/NAME, else NAME on PATH
  if [[ -x "$ROOT/.venv/bin/$1" ]]; then echo "$ROOT/.venv/bin/$1"; return; fi
  command -v "$1" 2>/dev/null || die "'$1' not found: run bash scripts/setup.sh (creates .venv) or put $1 on PATH."
}
PYTHON="${SEAP_PYTHON:-$(tool python)}"
export MLFLOW_BIN="${MLFLOW_BIN:-$(tool mlflow)}"
PREFECT_BIN="${PREFECT_BIN:-$(tool prefect)}"

SEAP_INFRA_DIR="${SEAP_INFRA_DIR:-$ROOT/runs/infra}"
mkdir -p "$SEAP_INFRA_DIR"
export SEAP_INFRA_DIR="$(cd "$SEAP_INFRA_DIR" && pwd)"
export MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}" MLFLOW_PORT="${MLFLOW_PORT:-5000}"
PREFECT_HOST="${PREFECT_HOST:-127.0.0.1}" PREFECT_PORT="${PREFECT_PORT:-4200}"
export MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-s3://${SEAP_MLFLOW_BUCKET:-seap-mlflow}/artifacts}"
TIMEOUT="${SEAP_INFRA_TIMEOUT:-180}"

client_host() { [[ "$1" == 0.0.0.0 || "$1" == "::" ]] && echo 127.0.0.1 || echo "$1"; }
MLFLOW_URL="http://$(client_host "$MLFLOW_HOST"):$MLFLOW_PORT"
PREFECT_URL="http://$(client_host "$PREFECT_HOST"):$PREFECT_PORT"
PREFECT_API="$PREFECT_URL/api"

http_ok() {  # http_ok URL: true when URL answers 2xx within 3 s
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 3 -o /dev/null "$1" 2>/dev/null
  else
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1" 2>/dev/null
  fi
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
group_alive() {  # group_alive PGID: true while a non-zombie process of the group exists
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found=1} END {exit !found}'
}
group_is() {  # group_is PGID PATTERN: true when a process of the group has PATTERN in its command line
  ps -e -o pgid=,args= | awk -v g="$1" '$1 == g' | grep -q -- "$2"
}
# state NAME PATTERN URL -> running | starting | stopped (a stale pid file is removed)
state() {
  local pidf="$SEAP_INFRA_DIR/$1.pid" pid
  if [[ -f "$pidf" ]]; then
    pid="$(cat "$pidf")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && group_alive "$pid" && group_is "$pid" "$2"; then
      if [[ -z "$3" ]] || http_ok "$3"; then echo running; else echo starting; fi
      return
    fi
    rm -f "$pidf"
  fi
  echo stopped
}
start_bg() {  # start_bg NAME CMD...: run CMD in a new session (pgid = pid), log and pid file in the state dir
  local name="$1"; shift
  local log="$SEAP_INFRA_DIR/$name.log"
  echo "=== $(date -u +%FT%TZ) start.sh starts $name" >>"$log"
  setsid "$@" >>"$log" 2>&1 </dev/null &
  echo $! >"$SEAP_INFRA_DIR/$name.pid"
}

mlflow_state="$(state mlflow 'mlflow' "$MLFLOW_URL/health")"
prefect_state="$(state prefect 'prefect server' "$PREFECT_API/health")"
# Refuse to start over a port someone else holds, before anything is started.
if [[ "$mlflow_state" == stopped ]] && port_open "$(client_host "$MLFLOW_HOST")" "$MLFLOW_PORT"; then
  die "port $MLFLOW_PORT is in use by a process this script did not start; stop it or set MLFLOW_PORT."
fi
if [[ "$prefect_state" == stopped ]] && port_open "$(client_host "$PREFECT_HOST")" "$PREFECT_PORT"; then
  die "port $PREFECT_PORT is in use by a process this script did not start; stop it or set PREFECT_PORT."
fi

# --- MLflow ---------------------------------------------------------------------------------------
case "$mlflow_state" in
  running) echo "MLflow already running (pid $(cat "$SEAP_INFRA_DIR/mlflow.pid")): $MLFLOW_URL" ;;
  starting) echo "MLflow is starting (pid $(cat "$SEAP_INFRA_DIR/mlflow.pid"))" ;;
  stopped)
    if [[ "$MLFLOW_ARTIFACTS_DESTINATION" == s3://* && "${SEAP_CREATE_BUCKETS:-1}" != 0 ]]; then
      bucket="${MLFLOW_ARTIFACTS_DESTINATION#s3://}"; bucket="${bucket%%/*}"
      rc=0; "$PYTHON" infra/create_buckets.py --wait "${SEAP_BUCKET_WAIT:-60}" "$bucket" "${SEAP_DVC_BUCKET:-seap-dvc}" || rc=$?
      (( rc == 0 )) || { echo "start.sh: error: could not create the S3 buckets (see above); nothing was started." >&2; exit "$rc"; }
    fi
    start_bg mlflow bash "$ROOT/mlflow/server/serve.sh"
    echo "MLflow starting (pid $(cat "$SEAP_INFRA_DIR/mlflow.pid"), log $SEAP_INFRA_DIR/mlflow.log)" ;;
esac

# --- Prefect server -------------------------------------------------------------------------------
case "$prefect_state" in
  running) echo "Prefect already running (pid $(cat "$SEAP_INFRA_DIR/prefect.pid")): $PREFECT_URL" ;;
  starting) echo "Prefect is starting (pid $(cat "$SEAP_INFRA_DIR/prefect.pid"))" ;;
  stopped)
    mkdir -p "$SEAP_INFRA_DIR/prefect"
    # The Prefect server needs no S3 credentials: drop them from its environment.
    start_bg prefect env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
      PREFECT_HOME="$SEAP_INFRA_DIR/prefect" PREFECT_API_URL="$PREFECT_API" \
      PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true \
      "$PREFECT_BIN" server start --host "$PREFECT_HOST" --port "$PREFECT_PORT"
    echo "Prefect starting (pid $(cat "$SEAP_INFRA_DIR/prefect.pid"), log $SEAP_INFRA_DIR/prefect.log)" ;;
esac

# --- wait for both /health endpoints --------------------------------------------------------------
deadline=$(( SECONDS + TIMEOUT ))
pending=(mlflow prefect)
while (( ${#pending[@]} )); do
  left=()
  for name in "${pending[@]}"; do
    if [[ "$name" == mlflow ]]; then url="$MLFLOW_URL/health"; else url="$PREFECT_API/health"; fi
    if http_ok "$url"; then echo "$name healthy: $url"; continue; fi
    pid="$(cat "$SEAP_INFRA_DIR/$name.pid" 2>/dev/null || true)"
    if [[ -z "$pid" ]] || ! group_alive "$pid"; then
      rm -f "$SEAP_INFRA_DIR/$name.pid"
      die "the $name server exited during start-up; see $SEAP_INFRA_DIR/$name.log"
    fi
    left+=("$name")
  done
  pending=("${left[@]+"${left[@]}"}")
  (( ${#pending[@]} )) || break
  (( SECONDS < deadline )) || die "${pending[*]} not healthy after ${TIMEOUT} s (still running; raise SEAP_INFRA_TIMEOUT" \
    "or stop with infra/single-machine/stop.sh); see $(printf "$SEAP_INFRA_DIR/%s.log " "${pending[@]}")"
  sleep 1
done

# --- optional worker ------------------------------------------------------------------------------
if (( with_worker )); then
  if [[ "$(state worker 'prefect worker' '')" == running ]]; then
    echo "Prefect worker already running (pid $(cat "$SEAP_INFRA_DIR/worker.pid"))"
  else
    wlog="$SEAP_INFRA_DIR/worker.log"
    export PREFECT_API_URL="$PREFECT_API" PREFECT_HOME="$SEAP_INFRA_DIR/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false
    echo "registering the deployments of prefect.yaml on pool seap-process (log $wlog)"
    { "$PREFECT_BIN" work-pool create seap-process --type process --overwrite \
        && "$PREFECT_BIN" --no-prompt deploy --all; } >>"$wlog" 2>&1 \
      || die "registering the deployments failed; see $wlog"
    start_bg worker "$PREFECT_BIN" worker start --pool seap-process
    sleep 3
    group_alive "$(cat "$SEAP_INFRA_DIR/worker.pid")" || die "the Prefect worker exited; see $wlog"
    echo "Prefect worker on pool seap-process (pid $(cat "$SEAP_INFRA_DIR/worker.pid"), log $wlog)"
  fi
fi

cat >"$SEAP_INFRA_DIR/env.sh" <<ENV
# Client settings for the services started by infra/single-machine/start.sh (no secrets).
export MLFLOW_TRACKING_URI=$MLFLOW_URL PREFECT_API_URL=$PREFECT_API
ENV
stop_cmd="bash infra/single-machine/stop.sh"
[[ "$SEAP_INFRA_DIR" == "$ROOT/runs/infra" ]] || stop_cmd="SEAP_INFRA_DIR=$SEAP_INFRA_DIR $stop_cmd"
cat <<EOF

MLflow UI/API:  $MLFLOW_URL   (artifacts: $MLFLOW_ARTIFACTS_DESTINATION, proxied by the server)
Prefect UI:     $PREFECT_URL
Prefect API:    $PREFECT_API
Point clients at them (or: source $SEAP_INFRA_DIR/env.sh):
  export MLFLOW_TRACKING_URI=$MLFLOW_URL PREFECT_API_URL=$PREFECT_API
Logs and pid files: $SEAP_INFRA_DIR
Stop: $stop_cmd
EOF
