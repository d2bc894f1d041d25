#!/usr/bin/env bash
# f/call 1: the K side's products on Mosaic GPU (Config(mosaic_grads_k=True), suffix +mgk) on
# a GPU for the first time: against their XLA oracle and the Triton kernels, the op with and
# without them at the three benchmark shapes, qdelta-check with them; then the cost of a
# Mosaic GPU call beyond its work.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 130 python3 benchmarks/mosaic_dev.py --variants "" --grads-k --reps 20 \
  --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128 \
  --out $R/gradsk.json > $R/gradsk.log 2>&1
echo "gradsk rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/gradsk.log | tail -14
timeout $((400 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 8x4096x6x128x256 \
  2x16384x6x128x256 8x4096x16x128x128 --impl pallas-mosaic pallas-mosaic+mgk --reps 10 \
  --warmup 2 --json $R/ops.json > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | tail -12
timeout $((480 - (SECONDS - t0))) python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 \
  --dtype bfloat16 --no-fd --implementations xla,pallas-mosaic+mgk > $R/check.log 2>&1
echo "check rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/check.log | tail -8
timeout $((540 - (SECONDS - t0))) python3 benchmarks/mosaic_dev.py --launch-cost 8 --reps 10 \
  --out $R/launch.json > $R/launch.log 2>&1
echo "launch rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/launch.log | tail -4
