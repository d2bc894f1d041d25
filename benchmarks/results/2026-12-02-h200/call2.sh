#!/usr/bin/env bash
# f/call 2: the 340m training step (4 x 4096 packed random text, bf16, layers unrolled) with the
# Triton kernels (the default) and with implementation="pallas-mosaic" (its K-side products
# on Mosaic GPU now for packed rows too), one after the other on this card; then the op alone
# at the step's shape, unpacked and with 2 documents a row.
. benchmarks/call_prelude.sh  # install, record the card, start t0
for impl in pallas-triton pallas-mosaic; do
  lim=$([ $impl = pallas-triton ] && echo 200 || echo $((470 - (SECONDS - t0))))
  timeout $lim python3 benchmarks/profile_step.py --implementation $impl --profile-steps 0 \
    --steps 10 --json $R/step_$impl.json > $R/step_$impl.log 2>&1
  echo "step $impl rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/step_$impl.log | tail -4
done
timeout $((560 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 4x4096x6x128x256 \
  --impl pallas-triton pallas-mosaic --docs 0 2 --reps 10 --warmup 2 \
  --json $R/step_op.json > $R/step_op.log 2>&1
echo "step_op rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/step_op.log | tail -8
