#!/usr/bin/env bash
# Stop what infra/single-machine/start.sh started: the Prefect worker, the Prefect server and the
# MLflow server, found through their pid files in $SEAP_INFRA_DIR (default: runs/infra of the repo).
#
#   bash infra/single-machine/stop.sh
#   SEAP_INFRA_DIR=/path/to/state bash infra/single-machine/stop.sh
#
# start.sh runs every service in its own session, so the pid is also the process-group id; the
# whole group gets SIGTERM (mlflow server spawns uvicorn children, prefect its services), then
# SIGKILL after SEAP_STOP_TIMEOUT seconds [20]. A pid file whose process group is gone, or belongs
# to some other program, is just removed. State (databases, logs) is kept.
set -euo pipefail
cd "$(dirname "$0")/../.."

SEAP_INFRA_DIR="${SEAP_INFRA_DIR:-$PWD/runs/infra}"
TIMEOUT="${SEAP_STOP_TIMEOUT:-20}"

group_alive() {  # group_alive PGID: true while a non-zombie process of the group exists
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found=1} END {exit !found}'
}
group_is() {  # group_is PGID PATTERN: true when a process of the group has PATTERN in its command line
  ps -e -o pgid=,args= | awk -v g="$1" '$1 == g' | grep -q -- "$2"
}

stop_one() {  # stop_one NAME PATTERN
  local name="$1" pattern="$2" pidf="$SEAP_INFRA_DIR/$1.pid" pid
  if [[ ! -f "$pidf" ]]; then echo "$name: not running (no pid file)"; return; fi
  pid="$(cat "$pidf")"
  if [[ ! "$pid" =~ ^[0-9]+$ ]] || ! group_alive "$pid" || ! group_is "$pid" "$pattern"; then
    echo "$name: not running (stale pid file removed)"; rm -f "$pidf"; return
  fi
  kill -TERM -- "-$pid" 2>/dev/null || true
  local deadline=$(( SECONDS + TIMEOUT ))
  while group_alive "$pid" && (( SECONDS < deadline )); do sleep 0.5; done
  if group_alive "$pid"; then
    echo "$name: still running after ${TIMEOUT} s, sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$pidf"
  echo "$name: stopped (pid $pid)"
}

[[ -d "$SEAP_INFRA_DIR" ]] || { echo "nothing to stop: $SEAP_INFRA_DIR does not exist"; exit 0; }
stop_one worker 'prefect worker'
stop_one prefect 'prefect server'
stop_one mlflow 'mlflow'
rm -f "$SEAP_INFRA_DIR/env.sh"
