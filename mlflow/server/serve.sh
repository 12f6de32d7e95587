#!/usr/bin/env bash
# Start the SEAP MLflow tracking server. This script is THE way the server is started: the
# compose service (infra/team, image mlflow/server/Dockerfile) and the single-machine script
# (infra/single-machine/start.sh) both run it, so flags and defaults live here only.
#
#   MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
#     bash mlflow/server/serve.sh
#
# Environment (defaults in brackets):
#   MLFLOW_BACKEND_STORE_URI      tracking/registry database [sqlite:///$SEAP_INFRA_DIR/mlflow.db];
#                                 e.g. postgresql://USER:PASSWORD@HOST:5432/mlflow (a secret: never printed)
#   SEAP_INFRA_DIR                state folder for the SQLite default [$PWD/runs/infra]
#   MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts [s3://${SEAP_MLFLOW_BUCKET:-seap-mlflow}/artifacts];
#                                 clients upload through the server (--serve-artifacts), so they need no S3 credentials
#   MLFLOW_HOST / MLFLOW_PORT / MLFLOW_WORKERS   [127.0.0.1 / 5000 / 1]
#   MLFLOW_S3_ENDPOINT_URL        S3 endpoint (MinIO, moto, ...); unset or empty = AWS S3
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (secrets), AWS_DEFAULT_REGION [us-east-1]
#                                 required when the artifacts destination is s3://
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers the server accepts (read by mlflow itself) [localhost and private IPs];
#                                 behind a DNS name (e.g. http://mlflow:5000 in compose) list it here
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's server-side job runner [false: SEAP does not use it]
#   MLFLOW_BIN                    the mlflow executable [mlflow on PATH]
#
# Credentials are read from the environment only; this script never prints them and passes
# none of them on the command line (they would show in `ps`).
set -euo pipefail

die() { echo "serve.sh: error: $*" >&2; exit 2; }
# Print a URI with any user:password@ part masked (backend URIs can carry a database password).
redact() { sed -E 's#(://)[^@]*@#\1***@#' <<<"$1"; }

MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-s3://${SEAP_MLFLOW_BUCKET:-seap-mlflow}/artifacts}"
MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-1}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"

# An empty endpoint means AWS; boto3 must not see an empty string.
if [[ -z "${MLFLOW_S3_ENDPOINT_URL:-}" ]]; then unset MLFLOW_S3_ENDPOINT_URL; fi

if [[ "$MLFLOW_ARTIFACTS_DESTINATION" == s3://* ]]; then
  missing=()
  [[ -n "${AWS_ACCESS_KEY_ID:-}" ]] || missing+=(AWS_ACCESS_KEY_ID)
  [[ -n "${AWS_SECRET_ACCESS_KEY:-}" ]] || missing+=(AWS_SECRET_ACCESS_KEY)
  if (( ${#missing[@]} )); then
    die "the artifacts destination $MLFLOW_ARTIFACTS_DESTINATION is on S3, but no S3 credentials are set" \
        "(missing: ${missing[*]}). Export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the server's environment" \
        "(plus MLFLOW_S3_ENDPOINT_URL for MinIO, AWS_DEFAULT_REGION for AWS), e.g. from infra/team/.env;" \
        "never put them on the command line."
  fi
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
fi

if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
  SEAP_INFRA_DIR="${SEAP_INFRA_DIR:-$PWD/runs/infra}"
  mkdir -p "$SEAP_INFRA_DIR"
  SEAP_INFRA_DIR="$(cd "$SEAP_INFRA_DIR" && pwd)"
  MLFLOW_BACKEND_STORE_URI="sqlite:///$SEAP_INFRA_DIR/mlflow.db"
fi

command -v "$MLFLOW_BIN" >/dev/null 2>&1 \
  || die "mlflow executable '$MLFLOW_BIN' not found. Install mlflow==3.17.2 (bash scripts/setup.sh) or set MLFLOW_BIN."
[[ "$MLFLOW_PORT" =~ ^[0-9]+$ ]] || die "MLFLOW_PORT must be a number (got '$MLFLOW_PORT')."
[[ "$MLFLOW_WORKERS" =~ ^[0-9]+$ ]] || die "MLFLOW_WORKERS must be a number (got '$MLFLOW_WORKERS')."

export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=true
# MLflow's server-side job runner (GenAI jobs; eight huey processes) is not used by SEAP: off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

endpoint="AWS"
if [[ -n "${MLFLOW_S3_ENDPOINT_URL:-}" ]]; then endpoint="$(redact "$MLFLOW_S3_ENDPOINT_URL")"; fi
echo "serve.sh: mlflow server on http://$MLFLOW_HOST:$MLFLOW_PORT" \
     "(backend $(redact "$MLFLOW_BACKEND_STORE_URI"), artifacts $(redact "$MLFLOW_ARTIFACTS_DESTINATION")," \
     "S3 endpoint $endpoint, workers $MLFLOW_WORKERS)" >&2

# The backend URI is handed over through the environment (`mlflow server` reads
# MLFLOW_BACKEND_STORE_URI as its --backend-store-uri), not argv, so a database password never
# shows up in `ps` or in process listings.
export MLFLOW_BACKEND_STORE_URI
exec "$MLFLOW_BIN" server \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "$MLFLOW_HOST" \
  --port "$MLFLOW_PORT" \
  --workers "$MLFLOW_WORKERS"
