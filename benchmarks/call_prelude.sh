# Sourced by the device-call scripts under benchmarks/results/ (`. benchmarks/call_prelude.sh`):
# results go to $OUT/r (what the device tool brings back), the project is installed without
# dependencies (plus fla from .wheels/), the card is recorded, and t0 starts the clock the
# scripts' per-step time limits count from.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p "$R"
t0=$SECONDS
bash benchmarks/gpu_install.sh "$R/install.log" || exit 1
nvidia-smi -L | tee "$R/device.txt"
