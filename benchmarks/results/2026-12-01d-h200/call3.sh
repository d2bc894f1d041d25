#!/usr/bin/env bash
# d/call 3: T in the compute dtype where no backward reads it: the solve + W/U pair both ways
# (pallas_dev stage times wu / wu_infer) at the three benchmark shapes; the op at those shapes
# with fla's forward in the same process; qdelta-check at the 340M layer (bf16).
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 200 python3 benchmarks/pallas_dev.py \
  --shapes 8x4096x6x128x256,8x4096x16x128x128,2x16384x6x128x256 --extra-fp32 "" --reps 30 \
  --sweep-only --out $R/stages.json > $R/stages.log 2>&1
echo "stages rc=$? at $((SECONDS-t0))s"; grep -E "^\[|stage_ms: \{'wu': 0\.[0-9]{3}," $R/stages.log
timeout 250 python3 benchmarks/ops.py --shapes 8x4096x6x128x256 8x4096x16x128x128 \
  2x16384x6x128x256 --impl pallas pallas-mosaic --fla --reps 20 --warmup 3 \
  --json $R/ops.json > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | tail -16
timeout $((560 - (SECONDS - t0))) python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 \
  --dtype bfloat16 --no-fd > $R/check.log 2>&1
echo "check rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/check.log | tail -14
