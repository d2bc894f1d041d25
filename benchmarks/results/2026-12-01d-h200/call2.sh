#!/usr/bin/env bash
# d/call 2: the forward stages' launch settings swept at B8 T4096 H16 K128 V128 and B2 T16384
# H6 (pallas_dev --sweep-only: stage times, no XLA checks), the Mosaic V tile at H16.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 170 python3 benchmarks/pallas_dev.py --shapes 8x4096x16x128x128 --extra-fp32 "" \
  --reps 20 --sweep-only --sweep-s 130 --sweep-stages solve,wu,output,state,dqkw \
  --out $R/sweep_h16.json > $R/sweep_h16.log 2>&1
echo "sweep_h16 rc=$? at $((SECONDS-t0))s"; grep -E "^(solve|wu|output|state|dqkw) |stage_ms" $R/sweep_h16.log | tail -40
timeout 150 python3 benchmarks/pallas_dev.py --shapes 2x16384x6x128x256 --extra-fp32 "" \
  --reps 20 --sweep-only --sweep-s 110 --sweep-stages state,solve,wu,output \
  --out $R/sweep_16k.json > $R/sweep_16k.log 2>&1
echo "sweep_16k rc=$? at $((SECONDS-t0))s"; grep -E "^(solve|wu|output|state) |stage_ms" $R/sweep_16k.log | tail -30
timeout $((540 - (SECONDS - t0))) python3 benchmarks/mosaic_dev.py --shapes 8x4096x16x128x128 \
  --variants bv64_s2,bv64_s1,bv128_s1 --reps 20 --out $R/mosaic_h16.json > $R/mosaic_h16.log 2>&1
echo "mosaic_h16 rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/mosaic_h16.log | tail -15
