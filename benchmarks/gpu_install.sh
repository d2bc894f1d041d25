#!/usr/bin/env bash
# Installs the project on the device machine (no network there: no dependencies, no build
# isolation), plus fla, the in-run anchor, from .wheels/ when that folder exists.
#   bash benchmarks/gpu_install.sh LOGFILE
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${1:-/dev/null}
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$LOG" 2>&1 || {
    echo "install failed"; tail -20 "$LOG"; exit 1; }
if ls .wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps .wheels/*.whl >>"$LOG" 2>&1 || true
fi
