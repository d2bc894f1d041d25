#!/usr/bin/env bash
# c/call 2: the guard after the fix; the 340m step (Triton, stand-in, Mosaic) and the isolated op
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 80 python3 benchmarks/ops.py --shapes 8x4096x6x128x256 --impl pallas --docs 0 32 \
  --unguarded --reps 30 --warmup 5 --json $R/guard.json > $R/guard.log 2>&1
echo "guard rc=$? at $((SECONDS-t0))s"; tail -7 $R/guard.log
for args in "pallas-triton" "pallas-triton --stand-in"; do
  echo "== step $args"
  timeout 130 python3 benchmarks/results/2026-12-01c-h200/steptime.py $args --steps 10 2>&1 | grep -E "RESULT|Error" | tee -a $R/steps.log
  echo "   at $((SECONDS-t0))s"
done
timeout 90 python3 benchmarks/ops.py --shapes 4x4096x6x128x256 --impl pallas pallas-mosaic \
  --docs 0 2 --reps 30 --warmup 5 --json $R/iso.json > $R/iso.log 2>&1
echo "iso rc=$? at $((SECONDS-t0))s"; tail -7 $R/iso.log
echo "== step pallas-mosaic"
timeout 200 python3 benchmarks/results/2026-12-01c-h200/steptime.py pallas-mosaic --steps 10 2>&1 | grep -E "RESULT|Error" | tee -a $R/steps.log
echo "   at $((SECONDS-t0))s"
