#!/usr/bin/env bash
# Nsight Compute over one call of each profiled function (benchmarks/profile_kernels.py):
# per kernel duration, DRAM and SM throughput, registers, occupancy and warp stall reasons.
#   bash benchmarks/ncu_profile.sh            # pallas fwd+bwd and fla fwd, 340M layer, bf16
#   PROFILES="pallas:--no-save-residuals" bash benchmarks/ncu_profile.sh   # as in BENCHMARKS.md
# Writes $OUT/ncu_<n>.csv (raw) and prints a table per profile. Clocks are left alone
# (--clock-control none), as the device METHOD asks.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qdelta_ncu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -n "${SKIP_INSTALL:-}" ] || bash benchmarks/gpu_install.sh "$OUT/install.log" || exit 1
NCU=${NCU:-ncu}
STALLS=""
for s in long_scoreboard short_scoreboard barrier wait mio_throttle math_pipe_throttle \
    lg_throttle not_selected selected membar dispatch_stall no_instruction branch_resolving; do
  STALLS="$STALLS,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio"
done
PROFILES=${PROFILES:-"pallas: fla:"}
n=0
for prof in $PROFILES; do
  n=$((n + 1))
  impl=${prof%%:*}; extra=${prof#*:}; extra=${extra//,/ }
  echo "== profile $n: $impl $extra"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${PROFILE_LIMIT:-240}" "$NCU" --clock-control none \
    --profile-from-start off --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats --metrics "${STALLS#,}" --csv --page details \
    "$PY" benchmarks/profile_kernels.py --impl "$impl" $extra >"$OUT/ncu_$n.csv" 2>"$OUT/ncu_$n.err"
  echo "rc $?"; tail -3 "$OUT/ncu_$n.err"
  "$PY" benchmarks/ncu_summary.py "$OUT/ncu_$n.csv" | tee "$OUT/ncu_$n.md"
done
