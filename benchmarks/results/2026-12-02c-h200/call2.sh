#!/usr/bin/env bash
# h/call 2: the Mosaic GPU state pass and reverse pass with their float32 state tile in a
# scoped buffer (the pipeline buffers reuse its bytes): at one pipeline step and V tiles of 64
# a CTA now fits twice on a multiprocessor. Each variant against the xla stages and the Triton
# kernels at the three benchmark shapes (unpacked; packed rows at the 340M layer), then the op
# with the default depth (2) and with depth 1 (+ms1). Results packed into one archive.
. benchmarks/call_prelude.sh  # install, record the card, start t0
trap 'tar czf $OUT/r.tgz -C $R . ; rm -rf $R' EXIT
V=res_bv64_s2,res_bv64_s1,bv64_s2,bv64_s1,res_bv32_s2,res_bv32_s1,rev_fd_bv64_s2,rev_fd_bv64_s1
V=$V,rev_fd_bv32_s2,rev_fd_bv32_s1,seg_res_bv64_s2,seg_res_bv64_s1,seg_rev_fd_bv64_s2
V=$V,seg_rev_fd_bv64_s1
timeout 300 python3 benchmarks/mosaic_dev.py --variants $V --reps 30 \
  --shapes 8x4096x6x128x256,8x4096x16x128x128,2x16384x6x128x256 --out $R/depth.json \
  > $R/depth.log 2>&1
echo "depth rc=$? at $((SECONDS-t0))s"; grep -E '^(==|mosaic|triton)' $R/depth.log | tail -40
timeout $((570 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 8x4096x6x128x256 \
  8x4096x16x128x128 --impl pallas-mosaic pallas-mosaic+ms1 --reps 20 --warmup 3 \
  --json $R/ops_depth.json > $R/ops_depth.log 2>&1
echo "ops_depth rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/ops_depth.log | tail -12
