#!/usr/bin/env bash
# d/call 1: the solve and W/U in one launch (Config.fuse_solve_wu) against two, at the three
# benchmark shapes with fla's forward in the same process; then the fused kernel's settings
# swept stage by stage at the 340M layer and at H16.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 260 python3 benchmarks/ops.py --shapes 8x4096x6x128x256 8x4096x16x128x128 \
  2x16384x6x128x256 --impl pallas pallas+fused pallas-mosaic pallas-mosaic+fused --fla \
  --reps 20 --warmup 3 --json $R/ops.json > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | tail -22
timeout 150 python3 benchmarks/pallas_dev.py --shapes 8x4096x16x128x128 --extra-fp32 "" \
  --reps 20 --sweep-s 70 --sweep-stages solve_wu_infer,solve_wu,solve \
  --out $R/dev_h16.json > $R/dev_h16.log 2>&1
echo "dev_h16 rc=$? at $((SECONDS-t0))s"
grep -E "^solve|stage_ms|solve_wu\.|error" $R/dev_h16.log | tail -30
timeout $((560 - (SECONDS - t0))) python3 benchmarks/pallas_dev.py --shapes 8x4096x6x128x256 \
  --extra-fp32 "" --reps 20 --sweep-s 60 --sweep-stages solve_wu_infer,solve_wu \
  --out $R/dev_340.json > $R/dev_340.log 2>&1
echo "dev_340 rc=$? at $((SECONDS-t0))s"
grep -E "^solve|stage_ms|solve_wu\.|error" $R/dev_340.log | tail -30
