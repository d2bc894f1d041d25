#!/usr/bin/env bash
# e/call 3: pallas-mosaic as it now stands (Mosaic dqkw, dD0 formed in the Mosaic reverse pass,
# V tiles of 32 at low B*H) checked end to end at B2 T16384 H6 (bf16), then timed at the three
# benchmark shapes beside fla's forward.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 130 python3 -m qdelta_jax.check --shapes 2x16384x6x128x256 \
  --dtype bfloat16 --no-fd --implementations xla,pallas-mosaic > $R/check16k.log 2>&1
echo "check16k rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/check16k.log | tail -6
timeout $((370 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 8x4096x6x128x256 \
  2x16384x6x128x256 8x4096x16x128x128 --impl pallas-mosaic --fla --reps 10 --warmup 2 \
  --json $R/ops.json > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | tail -10
