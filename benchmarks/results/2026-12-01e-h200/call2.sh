#!/usr/bin/env bash
# e/call 2: the core's own q/k L2 normalisation (one launch forward, its backward inside
# chunk_grads_k), the Mosaic state-side gradients by default and tiles of 32 in Mosaic training
# at low B*H, checked end to end (qdelta-check, bf16, unpacked and 32 documents a row); the
# Mosaic reverse pass forming dD0 itself against the XLA stages; the cost of a Mosaic call
# beyond its work; then the op with the L2 kernels outside / inside and with dD0 fused.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 150 python3 -m qdelta_jax.check --shapes 8x4096x6x128x256,2x16384x6x128x256 \
  --dtype bfloat16 --no-fd --implementations xla,pallas,pallas-mosaic > $R/check.log 2>&1
echo "check rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/check.log | tail -14
timeout 80 python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 --docs 32 \
  --dtype bfloat16 --no-fd --implementations xla,pallas,pallas-mosaic > $R/checkp.log 2>&1
echo "checkp rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/checkp.log | tail -8
timeout 110 python3 benchmarks/mosaic_dev.py \
  --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128 \
  --variants rev_bv64_s2,rev_fd_bv64_s2,rev_bv32_s2,rev_fd_bv32_s2,seg_rev_bv64_s2,seg_rev_fd_bv64_s2 \
  --reps 20 --out $R/mosaic.json > $R/mosaic.log 2>&1
echo "mosaic rc=$? at $((SECONDS-t0))s"; grep -E "^(mosaic|triton|==)" $R/mosaic.log
timeout 45 python3 benchmarks/mosaic_dev.py --launch-cost 50 --reps 20 \
  --out $R/launch.json > $R/launch.log 2>&1
echo "launch rc=$? at $((SECONDS-t0))s"; grep -E "^launch|wall" $R/launch.log
timeout $((540 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 8x4096x6x128x256 \
  2x16384x6x128x256 8x4096x16x128x128 \
  --impl pallas-mosaic pallas-mosaic+l2out pallas-mosaic+fdd0 --reps 10 --warmup 2 \
  --json $R/ops.json > $R/ops.log 2>&1
echo "ops rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/ops.log | tail -14
