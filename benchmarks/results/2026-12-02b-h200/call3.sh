#!/usr/bin/env bash
# g/call 3: qdelta-check end to end with the new defaults of pallas-mosaic (the forward's local
# stage on Mosaic GPU; the fused local gradients on packed rows too) at the 340M layer,
# unpacked and with 32 packed documents a row; then the unrolled 340m training step's compile
# time at 2, 4 and 8 layers on the Mosaic GPU path and on the Triton kernels. Results packed
# into one archive (the device tool returns at most 8 files).
. benchmarks/call_prelude.sh  # install, record the card, start t0
trap 'tar czf $OUT/r.tgz -C $R . ; rm -rf $R' EXIT
timeout 110 python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 --dtype bfloat16 --no-fd \
  --implementations xla,pallas-mosaic,pallas-mosaic+tloc > $R/check.log 2>&1
echo "check rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/check.log | tail -5
timeout $((200 - (SECONDS - t0))) python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 \
  --dtype bfloat16 --no-fd --docs 32 --implementations xla,pallas-mosaic > $R/checkp.log 2>&1
echo "checkp rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/checkp.log | tail -4
timeout $((420 - (SECONDS - t0))) python3 benchmarks/compile_time.py --impl pallas-mosaic \
  pallas-triton --layers 2 4 8 --compile-limit 80 --json $R/compile_time.json \
  > $R/compile_time.log 2>&1
echo "compile_time rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/compile_time.log | tail -8
