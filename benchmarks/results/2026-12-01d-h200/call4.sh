#!/usr/bin/env bash
# d/call 4: the fused decode kernel's V tile and warps at batch 16 and 64 (340m, bf16,
# scan_layers), XLA's step in the first run as the anchor.
. benchmarks/call_prelude.sh  # install, record the card, start t0
impls=fused,jnp
for cfg in "32 4" "64 4" "128 4" "64 8" "16 2"; do
  set -- $cfg
  timeout 95 python3 benchmarks/decode.py --impls $impls --batch-sizes 16,64 --block-v $1 \
    --num-warps $2 --no-breakdown --scan-layers --steps 32 --reps 5 \
    --json $R/decode_bv$1_w$2.json > $R/decode_bv$1_w$2.log 2>&1
  echo "bv$1 w$2 rc=$? at $((SECONDS-t0))s"; grep -E "^\| (fused|jnp)" $R/decode_bv$1_w$2.log
  impls=fused
  (( SECONDS - t0 > 430 )) && break
done
