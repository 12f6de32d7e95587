#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the locked dependency tree
# (requirements.lock) and this package installed in editable mode.
#
#   SEAP_PYTHON       interpreter to build the venv from (default: python3)
#   SEAP_FIND_LINKS   extra wheel folder (default: /opt/wheels when it exists; it holds
#                     the CPU build of torch 2.13.0 on the project's machines)
#
# GPU users: install a CUDA torch 2.13.0 first (`pip install torch==2.13.0`), then
# `pip install -e .`; the pins in pyproject.toml accept any 2.13.0 build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${SEAP_PYTHON:-python3}"
VENV=.venv
LOCK=requirements.lock
FIND_LINKS="${SEAP_FIND_LINKS:-}"
if [ -z "$FIND_LINKS" ] && [ -d /opt/wheels ]; then FIND_LINKS=/opt/wheels; fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.seap-installed"
want="$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing the locked dependencies (first run: a few minutes)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
args=(--python "$VENV/bin/python")
if [ -n "$FIND_LINKS" ]; then args+=(--find-links "$FIND_LINKS"); fi
"$VENV/bin/uv" pip install -q "${args[@]}" -r "$LOCK"
"$VENV/bin/uv" pip install -q "${args[@]}" --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done"
