#!/usr/bin/env bash
# Every GPU measurement recorded in BENCHMARKS.md and docs/RESULTS.md, in one script, so a lease
# runs them together on one card. Sections: check, check340, infer, dev, seqsweep, ops, ops340,
# opspack, anchors, authors, mosaic, mtrain, dqkw, gradsk, fused, local, compile, launch, prof,
# steps, crossover, ncu, decode, train, train{1,2}_{unrolled,scan}, recall (default: ops train decode check).
# benchmarks/gpu_lanes.sh runs groups of sections on different GPUs of one host at once. Each
# step has its own time limit so that one slow step cannot eat the others.
#
#   bash benchmarks/gpu_all.sh                      # ops train decode check
#   bash benchmarks/gpu_all.sh recall               # the recall experiment alone
#
# Writes logs and JSON under $RES (default /tmp/qdelta_gpu) and packs them into
# $OUT/results.tgz when $OUT is set (the device tool returns at most 8 files). Uses the image's
# python3; installs the project without dependencies, and fla (the in-run anchor) from .wheels/
# when that folder exists. Re-render the recall docs afterwards with
# `python -m experiments.recall --from-json recall/recall.json`.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${RES:-/tmp/qdelta_gpu}
mkdir -p "$RES"
pack() { [[ -n "${OUT:-}" ]] && tar czf "$OUT/results.tgz" -C "$RES" . ; }
trap pack EXIT
OUT_DIR=$RES
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
sections=${*:-ops train decode check}

if [[ -z "${SKIP_INSTALL:-}" ]]; then
    bash benchmarks/gpu_install.sh "$OUT_DIR/install.log" || exit 1
fi
nvidia-smi -L | tee "$OUT_DIR/device.txt"
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" | tee -a "$OUT_DIR/device.txt"

step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0))s"
    grep -v -E "Warning|warn\(|^\s*$" "$OUT_DIR/$name.log" | tail -n 30
    pack  # after every step: a lease that runs out still returns what is done
}

for s in $sections; do
    case $s in
    check)  # the default qdelta-check: the benchmark shapes, the 1B layer, T 32768; both dtypes
        step check ${CHECK_LIMIT:-420} "$PY" -m qdelta_jax.check
        ;;
    dev)  # every Pallas stage against xla.py, per-stage times, save_residuals, the config sweep
        step pallas_dev ${DEV_LIMIT:-420} "$PY" benchmarks/pallas_dev.py --sweep-s ${SWEEP_S:-60} \
            --out "$OUT_DIR/pallas_dev.json"
        ;;
    check340)  # the 340M layer, unpacked and 32 packed documents a row; B2 T16384 (bf16)
        step check340 ${CHECK_LIMIT:-300} "$PY" -m qdelta_jax.check --shapes 8x4096x6x128x256 --no-fd
        step check340p ${CHECK_LIMIT:-300} "$PY" -m qdelta_jax.check --shapes 8x4096x6x128x256 \
            --docs 32 --no-fd
        step check16k ${CHECK_LIMIT:-300} "$PY" -m qdelta_jax.check --shapes 2x16384x6x128x256 \
            --dtype bfloat16 --no-fd
        ;;
    opspack)  # pallas unpacked and with 32 packed documents a row, fla's forward, SPEC shapes
        step opspack ${OPS_LIMIT:-300} "$PY" benchmarks/ops.py --fla --impl pallas --docs 0 32 \
            --reps 30 --warmup 5 --json "$OUT_DIR/opspack.json"
        ;;
    anchors)  # pallas (the default: Mosaic GPU on Hopper) and pallas-triton beside the
        # authors' kernel, fla's forward and flash attention (torch, its own process, first)
        step anchors ${ANCHORS_LIMIT:-540} "$PY" benchmarks/ops.py --anchors \
            --impl pallas-triton pallas --reps 30 --warmup 5 --json "$OUT_DIR/anchors.json"
        ;;
    seqsweep)  # per-stage checks and times at B2 T16384, the sequential passes' V tiles swept
        step seqsweep ${DEV_LIMIT:-300} "$PY" benchmarks/pallas_dev.py \
            --shapes 2x16384x6x128x256 --extra-fp32 "" --sweep-s ${SWEEP_S:-90} \
            --out "$OUT_DIR/seqsweep.json"
        ;;
    prof)  # the 340m training step by category, with the op and with its stand-in
        # Command buffers hide the kernels they hold from the profiler: off for the table
        # (the step time is also printed with them on, in the same process).
        XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
            step prof ${PROF_LIMIT:-200} "$PY" benchmarks/profile_step.py ${PROF_ARGS:-} \
            --json "$OUT_DIR/prof.json"
        XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
            step prof_standin ${PROF_LIMIT:-200} "$PY" benchmarks/profile_step.py --stand-in \
            ${PROF_ARGS:-} --json "$OUT_DIR/prof_standin.json"
        ;;
    steps)  # the 340m step timed (no profile): Triton / Mosaic training / stand-in, unrolled
        # and with scan_layers; then the op alone at the step's tokens (2 documents a row)
        for impl in pallas-triton pallas-mosaic; do
            for ov in "" "--model-overrides scan_layers=true"; do
                step "step_${impl}${ov:+_scan}" ${STEP_LIMIT:-300} "$PY" benchmarks/profile_step.py \
                    --implementation $impl $ov --profile-steps 0 --steps 20 \
                    --json "$OUT_DIR/step_${impl}${ov:+_scan}.json"
            done
        done
        step step_standin ${STEP_LIMIT:-300} "$PY" benchmarks/profile_step.py --stand-in \
            --profile-steps 0 --steps 20 --json "$OUT_DIR/step_standin.json"
        step step_op ${OPS_LIMIT:-180} "$PY" benchmarks/ops.py --shapes 4x4096x6x128x256 \
            --impl pallas-triton pallas-mosaic --docs 0 2 --reps 30 --warmup 5 \
            --json "$OUT_DIR/step_op.json"
        ;;
    crossover)  # Q-Delta against a Llama-style transformer over T, and long context
        step crossover ${XO_LIMIT:-400} "$PY" benchmarks/crossover.py ${XO_ARGS:-} \
            --out "$OUT_DIR/crossover.png" --json "$OUT_DIR/crossover.json"
        ;;
    infer)  # qdelta-check (o_infer: the Mosaic GPU forward) and the op, Mosaic vs Triton forward
        step check_infer ${CHECK_LIMIT:-200} "$PY" -m qdelta_jax.check --shapes 8x4096x6x128x256 \
            --no-fd --implementations xla,pallas,pallas-triton
        step opsinfer ${OPS_LIMIT:-300} "$PY" benchmarks/ops.py --fla --impl pallas pallas-triton \
            --reps 30 --warmup 5 --json "$OUT_DIR/opsinfer.json"
        ;;
    mtrain)  # pallas-mosaic (Mosaic forward with residuals + Mosaic reverse pass) end to end
        step check_mosaic ${CHECK_LIMIT:-200} "$PY" -m qdelta_jax.check --shapes 8x4096x6x128x256 \
            --no-fd --dtype bfloat16 --implementations xla,pallas-mosaic,pallas-triton
        step check_mosaicp ${CHECK_LIMIT:-200} "$PY" -m qdelta_jax.check --shapes 8x4096x6x128x256 \
            --no-fd --dtype bfloat16 --docs 32 --implementations xla,pallas-mosaic
        step opsmosaic ${OPS_LIMIT:-300} "$PY" benchmarks/ops.py --fla \
            --impl pallas-triton pallas-mosaic --docs ${OPS_DOCS:-0} \
            --reps 30 --warmup 5 --json "$OUT_DIR/opsmosaic.json"
        ;;
    mosaic)  # the Mosaic GPU kernels against the xla stages and the Triton kernels
        step mosaic ${MOSAIC_LIMIT:-300} "$PY" benchmarks/mosaic_dev.py
        ;;
    authors)  # the authors' PyTorch model's training step at the 340m preset, 4 x 4096 (torch)
        step authors ${AUTHORS_LIMIT:-540} "$PY" benchmarks/authors_step.py --authors \
            "${QDELTA_AUTHORS:-.anchors}" --preset 340m --batch 4 --seq-len 4096 \
            --json "$OUT_DIR/authors_step.json"
        ;;
    launch)  # the time a Mosaic GPU call costs beyond its work, against a Triton one
        step launch ${MOSAIC_LIMIT:-200} "$PY" benchmarks/mosaic_dev.py --launch-cost 20 \
            --out "$OUT_DIR/launch.json"
        ;;
    gradsk)  # the K side's products on Mosaic GPU against the Triton kernels; the op
        step gradsk ${MOSAIC_LIMIT:-200} "$PY" benchmarks/mosaic_dev.py --variants "" \
            --grads-k --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128
        step gradsk_ops ${OPS_LIMIT:-240} "$PY" benchmarks/ops.py --impl pallas-mosaic+nfl \
            pallas-mosaic+tgk --reps 20 --warmup 3 --json "$OUT_DIR/gradsk_ops.json"
        ;;
    fused)  # the fused local gradients' Mosaic GPU kernels against their oracles; the op;
        # qdelta-check with them on packed rows; the op on packed rows with and without them
        step fused ${MOSAIC_LIMIT:-200} "$PY" benchmarks/mosaic_dev.py --variants "" \
            --fused-local --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128
        step fused_ops ${OPS_LIMIT:-240} "$PY" benchmarks/ops.py --impl pallas-mosaic \
            pallas-mosaic+nfl --reps 20 --warmup 3 --json "$OUT_DIR/fused_ops.json"
        step fused_checkp ${CHECK_LIMIT:-200} "$PY" -m qdelta_jax.check \
            --shapes 8x4096x6x128x256 --no-fd --dtype bfloat16 --docs 32 \
            --implementations xla,pallas-mosaic
        step fused_opsp ${OPS_LIMIT:-240} "$PY" benchmarks/ops.py --impl pallas-mosaic \
            pallas-mosaic+nfl --docs 32 --reps 20 --warmup 3 --json "$OUT_DIR/fused_opsp.json"
        ;;
    local)  # the forward's local stage on Mosaic GPU against xla.chunk_local and the Triton
        # solve + W/U; qdelta-check; the op with it and with the Triton local stage (+tloc)
        step local ${MOSAIC_LIMIT:-240} "$PY" benchmarks/mosaic_dev.py --variants "" --local \
            --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128
        step local_check ${CHECK_LIMIT:-200} "$PY" -m qdelta_jax.check \
            --shapes 8x4096x6x128x256 --no-fd --dtype bfloat16 \
            --implementations xla,pallas-mosaic,pallas-mosaic+tloc
        step local_ops ${OPS_LIMIT:-300} "$PY" benchmarks/ops.py --impl pallas-mosaic \
            pallas-mosaic+tloc --reps 20 --warmup 3 --json "$OUT_DIR/local_ops.json"
        ;;
    compile)  # the unrolled 340m step's compile time against depth, Mosaic GPU and Triton
        step compile ${COMPILE_LIMIT:-420} "$PY" benchmarks/compile_time.py \
            --impl pallas-mosaic pallas-triton --layers 2 4 8 --json "$OUT_DIR/compile_time.json"
        ;;
    dqkw)  # the Mosaic GPU state-side gradients against the Triton kernel
        step dqkw ${MOSAIC_LIMIT:-200} "$PY" benchmarks/mosaic_dev.py --variants "" \
            --dqkw 32,64 --shapes 8x4096x6x128x256,2x16384x6x128x256,8x4096x16x128x128
        step dqkw_ops ${OPS_LIMIT:-240} "$PY" benchmarks/ops.py --impl pallas-mosaic+nfl \
            pallas-mosaic+tdqkw --reps 20 --warmup 3 --json "$OUT_DIR/dqkw_ops.json"
        ;;
    ops)
        step ops ${OPS_LIMIT:-300} "$PY" benchmarks/ops.py --fla --reps 30 --warmup 5 --json "$OUT_DIR/ops.json"
        ;;
    ops340)  # the 340M layer only: pallas (with and without save_residuals), xla, fla's forward
        step ops340 ${OPS_LIMIT:-180} "$PY" benchmarks/ops.py --shapes 8x4096x6x128x256 --fla \
            --impl pallas pallas-no-save-residuals xla --reps 30 --warmup 5 --json "$OUT_DIR/ops340.json"
        ;;
    ncu)  # Nsight Compute: per-kernel time, throughput, occupancy, stalls of one fwd+bwd
        OUT=$OUT_DIR SKIP_INSTALL=1 step ncu ${NCU_LIMIT:-200} bash benchmarks/ncu_profile.sh
        ;;
    decode)
        step decode ${DECODE_LIMIT:-240} "$PY" benchmarks/decode.py --preset 340m \
            --batch-sizes 1,16,64,256 --scan-layers --json "$OUT_DIR/decode.json"
        ;;
    train)
        OUT=$OUT_DIR STEPS=${STEPS:-50} SEQ=${SEQ:-2048} BATCH_PER_GPU=${BATCH_PER_GPU:-8} \
            step train ${TRAIN_LIMIT:-240} bash benchmarks/train_gpu.sh
        ;;
    train1_unrolled | train1_scan | train2_unrolled | train2_scan)
        # one training run: N GPUs (data parallel), blocks unrolled or in lax.scan (scan_layers)
        n=${s:5:1}
        mode=${s:7}
        overrides=
        [[ $mode == scan ]] && overrides=scan_layers=true
        OUT=$OUT_DIR STEPS=${STEPS:-100} SEQ=${SEQ:-2048} BATCH_PER_GPU=${BATCH_PER_GPU:-8} \
            GPU_COUNTS=$n TAG=-$mode MODEL_OVERRIDES=$overrides RUNS=/tmp/qdelta-train-$n-$mode \
            step "$s" ${TRAIN_LIMIT:-240} bash benchmarks/train_gpu.sh
        ;;
    recall)
        step recall ${RECALL_LIMIT:-400} "$PY" -m experiments.recall --out "$OUT_DIR/recall" \
            --docs "$OUT_DIR/recall" \
            --device-note "$(nvidia-smi -L | head -1)" ${RECALL_ARGS:-}
        ;;
    *) echo "unknown section $s"; exit 2 ;;
    esac
done
