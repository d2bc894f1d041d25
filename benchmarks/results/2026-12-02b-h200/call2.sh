#!/usr/bin/env bash
# g/call 2: the forward's local stage on Mosaic GPU (mosaic_local.chunk_local: A, T, W, U in
# one kernel; +mloc) on a GPU for the first time: against xla.chunk_local and the Triton solve
# + W/U at the three benchmark shapes, unpacked and packed; qdelta-check with it; the op with
# and without it. qdelta-check on 32 packed documents a row with the fused local gradients
# (+pfl; g/call 1's 60 s were too few). Then the 340m training step (4 x 4096 packed random
# text, bf16) with scan_layers=true (one compiled block) on the Mosaic GPU path, and on the
# Triton kernels as far as the time allows.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 140 python3 benchmarks/mosaic_dev.py --variants "" --local --reps 20 \
  --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128 \
  --out $R/local.json > $R/local.log 2>&1
echo "local rc=$? at $((SECONDS-t0))s"; grep -E "^==|mosaic|triton solve" $R/local.log | grep -v "File" | cut -c1-260 | tail -24
timeout $((190 - (SECONDS - t0))) python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 \
  --dtype bfloat16 --no-fd --implementations xla,pallas-mosaic+mloc > $R/check.log 2>&1
echo "check rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/check.log | tail -5
timeout $((290 - (SECONDS - t0))) python3 benchmarks/ops.py --impl pallas-mosaic \
  pallas-mosaic+mloc --reps 20 --warmup 3 --json $R/ops.json > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | grep -E "^\||^# " | tail -10
timeout $((400 - (SECONDS - t0))) python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 \
  --no-fd --dtype bfloat16 --docs 32 --implementations xla,pallas-mosaic+pfl \
  > $R/checkp.log 2>&1
echo "checkp rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/checkp.log | tail -4
for impl in pallas-mosaic pallas-triton; do
  timeout $((578 - (SECONDS - t0))) python3 benchmarks/profile_step.py --implementation $impl \
    --model-overrides scan_layers=true --profile-steps 0 --steps 10 \
    --json $R/step_scan_$impl.json > $R/step_scan_$impl.log 2>&1
  echo "step scan $impl rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/step_scan_$impl.log | tail -3
done
