#!/usr/bin/env bash
# g/call 1: issue 11's table in one run on one card: the authors' chunk_qdelta_rule, fla's
# chunk_gated_delta_rule forward and torch SDPA (a torch process first), then ours with the
# Triton training kernels (pallas) and with the Mosaic GPU path (pallas-mosaic, the fused local
# gradients on unpacked rows) at the three benchmark shapes; then qdelta-check on 32 packed
# documents a row with the fused local gradients' document-masked kernels (+pfl) on a GPU for
# the first time, and the op with them.
. benchmarks/call_prelude.sh  # install, record the card, start t0
timeout 60 python3 -m qdelta_jax.check --shapes 8x4096x6x128x256 --no-fd --dtype bfloat16 \
  --docs 32 --implementations xla,pallas-mosaic+pfl > $R/checkp.log 2>&1
echo "checkp rc=$? at $((SECONDS-t0))s"; grep -v -i -E "warn|^\s*$" $R/checkp.log | tail -5
timeout $((520 - (SECONDS - t0))) python3 benchmarks/ops.py --anchors --impl pallas pallas-mosaic \
  --reps 20 --warmup 3 --json $R/anchors.json > $R/anchors.log 2>&1
echo "anchors rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/anchors.log | grep -E "^\||^# " | tail -24
timeout $((575 - (SECONDS - t0))) python3 benchmarks/ops.py --shapes 8x4096x6x128x256 \
  --impl pallas-mosaic pallas-mosaic+pfl --docs 32 --reps 10 --warmup 2 \
  --json $R/opsp.json > $R/opsp.log 2>&1
echo "opsp rc=$? at $((SECONDS-t0))s"; grep -v -i warn $R/opsp.log | grep -E "^\||^# " | tail -6
