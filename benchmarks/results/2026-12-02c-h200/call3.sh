#!/usr/bin/env bash
# h/call 3: implementation="pallas" now trains on the Mosaic GPU kernels on Hopper:
# qdelta-check end to end with it at the 340M layer (bf16, unpacked and 32 packed documents a
# row), then the op with "pallas" (the default) and "pallas-triton" at the 340M layer.
. benchmarks/call_prelude.sh  # install, record the card, start t0
trap 'tar czf $OUT/r.tgz -C $R . ; rm -rf $R' EXIT
timeout 150 python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 --dtype bfloat16 --no-fd \
  --implementations xla,pallas > $R/check.log 2>&1
echo "check rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/check.log | tail -5
timeout $((300 - (SECONDS - t0))) python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 \
  --dtype bfloat16 --no-fd --docs 32 --implementations xla,pallas > $R/checkp.log 2>&1
echo "checkp rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/checkp.log | tail -4
timeout $((480 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 8x4096x6x128x256 \
  --impl pallas pallas-triton ${EXTRA_IMPL:-} --reps 20 --warmup 3 --json $R/ops.json \
  > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | grep -E "^\||^# " | tail -8
