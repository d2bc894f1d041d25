#!/usr/bin/env bash
# e/call 1: the Mosaic GPU state-side gradients (chunk_dqkw) checked against the Triton kernel
# and timed, V tiles 32 and 64, at the three benchmark shapes; the residual-writing Mosaic
# forward and the reverse pass with V tiles of 32 against the XLA stages; then the op with and
# without them, fla's forward in the same process.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 200 python3 benchmarks/mosaic_dev.py --dqkw 32,64 \
  --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128 \
  --variants res_bv64_s2,res_bv32_s2,rev_bv32_s2 --reps 20 \
  --out $R/mosaic.json > $R/mosaic.log 2>&1
echo "mosaic rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/mosaic.log | tail -40
timeout $((430 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 8x4096x6x128x256 \
  8x4096x16x128x128 --impl pallas-mosaic pallas-mosaic+mdqkw --fla --reps 20 --warmup 3 \
  --json $R/ops4k.json > $R/ops4k.log 2>&1
echo "ops4k rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops4k.log | tail -10
timeout $((585 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 2x16384x6x128x256 \
  --impl pallas-mosaic pallas-mosaic+mdqkw pallas-mosaic+mdqkw+mbv32 --fla --reps 20 \
  --warmup 3 --json $R/ops16k.json > $R/ops16k.log 2>&1
echo "ops16k rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops16k.log | tail -10
