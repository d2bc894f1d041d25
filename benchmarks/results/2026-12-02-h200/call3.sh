#!/usr/bin/env bash
# f/call 3: the V side of the local gradients on Mosaic GPU (+mgv) and the fused local
# gradients (+mfl: dA, dPs from D, then the state side fused with the K side's products) on a
# GPU for the first time: each kernel against its oracle, the op with each at the three
# benchmark shapes, qdelta-check with each; then the authors' kernel and fla's forward at the
# shapes in a torch process on the same card, as far as the time left allows.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 160 python3 benchmarks/mosaic_dev.py --variants "" --fused-local --grads-v --reps 20 \
  --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128 \
  --out $R/fused.json > $R/fused.log 2>&1
echo "fused rc=$? at $((SECONDS-t0))s"; grep -E "^==|mosaic|oracle|triton" $R/fused.log | grep -v "File" | tail -16
timeout $((340 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 8x4096x6x128x256 \
  2x16384x6x128x256 8x4096x16x128x128 --impl pallas-mosaic pallas-mosaic+mgv \
  pallas-mosaic+mfl --fla --reps 10 --warmup 2 --json $R/ops.json > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | grep "^|" | tail -14
timeout $((420 - (SECONDS - t0))) python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 \
  --dtype bfloat16 --no-fd --implementations xla,pallas-mosaic+mgv,pallas-mosaic+mfl \
  > $R/check.log 2>&1
echo "check rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/check.log | tail -6
timeout $((575 - (SECONDS - t0))) python3 benchmarks/anchors.py --shapes 8x4096x6x128x256 \
  2x16384x6x128x256 8x4096x16x128x128 --only authors fla --reps 10 --warmup 2 \
  --json $R/anchors.json > $R/anchors.log 2>&1
echo "anchors rc=$? at $((SECONDS-t0))s"; grep "# anchor" $R/anchors.log | cut -c1-300
