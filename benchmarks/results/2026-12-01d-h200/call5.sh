#!/usr/bin/env bash
# d/call 5: the Mosaic GPU kernels with V tiles of 32 (the [C, K] operands on the 64-byte
# swizzle) against 64, checked against the XLA stages, at the three benchmark shapes; then the
# op with either tile at T16384 and the 340M layer, fla's forward in the same process.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 125 python3 benchmarks/mosaic_dev.py \
  --shapes 2x16384x6x128x256,8x4096x6x128x256,8x4096x16x128x128 \
  --variants bv64_s2,bv32_s2,bv32_s3,rev_bv64_s2,rev_bv32_s2 --reps 20 \
  --out $R/mosaic.json > $R/mosaic.log 2>&1
echo "mosaic rc=$? at $((SECONDS-t0))s"; grep -E "^(mosaic|triton|  triton|==)" $R/mosaic.log
timeout $((290 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 2x16384x6x128x256 \
  8x4096x6x128x256 --impl pallas+mbv64 pallas+mbv32 --fla --reps 20 --warmup 3 \
  --json $R/ops.json > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | tail -12
