#!/usr/bin/env bash
# c/call 1: command buffers x backend at 4 layers; the backward stage sweep; the guard's cost
. benchmarks/call_prelude.sh  # install, record the card, start t0
echo "install done at $((SECONDS-t0))s"
for impl in pallas-triton pallas-mosaic; do for cb in on off; do
  if [ $cb = off ]; then flags="--xla_gpu_enable_command_buffer="; else flags=""; fi
  echo "== $impl cmdbuf=$cb"
  XLA_FLAGS="$flags" timeout 75 python3 benchmarks/results/2026-12-01c-h200/steptime.py $impl num_hidden_layers=4 --steps 10 2>&1 | grep -E "RESULT|Error" | tee -a $R/cmdbuf.log
done; done
echo "cmdbuf done at $((SECONDS-t0))s"
timeout 200 python3 benchmarks/pallas_dev.py --shapes 8x4096x6x128x256 --extra-fp32 "" \
  --sweep-s 120 --out $R/dev.json > $R/dev.log 2>&1
echo "dev rc=$? at $((SECONDS-t0))s"; grep -v Warn $R/dev.log | tail -60
timeout 80 python3 benchmarks/ops.py --shapes 8x4096x6x128x256 --impl pallas --docs 0 32 \
  --unguarded --reps 30 --warmup 5 --json $R/guard.json > $R/guard.log 2>&1
echo "guard rc=$? at $((SECONDS-t0))s"; tail -12 $R/guard.log
