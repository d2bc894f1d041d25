#!/usr/bin/env bash
# h/call 1: with every Mosaic GPU kernel shared across layers (one jitted function per kernel),
# the unrolled 340m step's compile time at 4 layers (Mosaic GPU and Triton), then the full
# unrolled 340m training step (4 x 4096 packed) on pallas-mosaic and on the Triton kernels
# (compile and step time), then the op at B2 T16384 with the Mosaic local stage.
# Results packed into one archive (the device tool returns at most 8 files).
. benchmarks/call_prelude.sh  # install, record the card, start t0
trap 'tar czf $OUT/r.tgz -C $R . ; rm -rf $R' EXIT
timeout 140 python3 benchmarks/compile_time.py --impl pallas-mosaic pallas-triton --layers 4 \
  --compile-limit 60 --json $R/compile_time.json > $R/compile_time.log 2>&1
echo "compile_time rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/compile_time.log | tail -6
timeout 210 python3 benchmarks/profile_step.py --implementation pallas-mosaic --profile-steps 0 \
  --steps 10 --json $R/step_mosaic.json > $R/step_mosaic.log 2>&1
echo "step_mosaic rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/step_mosaic.log | tail -6
timeout $((470 - (SECONDS - t0))) python3 benchmarks/profile_step.py --implementation pallas-triton \
  --profile-steps 0 --steps 10 --json $R/step_triton.json > $R/step_triton.log 2>&1
echo "step_triton rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/step_triton.log | tail -6
timeout $((580 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 2x16384x6x128x256 \
  --impl pallas-mosaic pallas-mosaic+tloc --reps 20 --warmup 3 --json $R/ops16k.json \
  > $R/ops16k.log 2>&1
echo "ops16k rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/ops16k.log | tail -8
