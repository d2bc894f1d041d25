#!/usr/bin/env bash
# Training throughput of the 340m preset on text: 1 GPU, then 2 GPUs data-parallel.
#
# Data: Python's own source tree (byte-level tokens, vocabulary 257 -> 320 in the model, so the
# model has ~275M parameters: the 340m preset's 32000-token embedding and head shrink). bf16
# compute, fp32 params, AdamW, lr 1e-3 with 20 warm-up steps; a couple of hundred steps each.
# Per-GPU batch is the same in both runs (global batch doubles on 2 GPUs), so tokens/s should
# about double. Each run prints a summary line with step time, tokens/s and MFU, and writes
# metrics.jsonl (per step: loss, step_time_s, tokens_per_s, mfu) and summary.json.
#
# MFU = flops_per_token * tokens/s / (GPUs * peak), flops_per_token = 6 * (params - input
# embedding) + 3 * layers * heads * 2 * (3CK + 2CV + 3KV) (the Q-Delta op, chunk C); peak = dense
# bf16 989 TFLOP/s for H100 SXM / H200 (override with PEAK_TFLOPS).
#
#   bash benchmarks/train_gpu.sh                  # defaults below
#   STEPS=300 SEQ=2048 BATCH_PER_GPU=8 bash benchmarks/train_gpu.sh
#   IMPL=xla bash benchmarks/train_gpu.sh         # the XLA chunked path instead of Pallas
#   REMAT=1 bash benchmarks/train_gpu.sh          # recompute blocks if memory runs out
#   MODEL_OVERRIDES=scan_layers=true bash benchmarks/train_gpu.sh   # blocks in lax.scan
#   GPU_COUNTS=2 TAG=-scan bash benchmarks/train_gpu.sh   # only the 2-GPU run, named gpu2-scan
#
# Results (small files only: metrics, summaries, stdout) go to $OUT/train_gpu when $OUT is set,
# else runs/train_gpu; checkpoints stay in $RUNS (default /tmp/qdelta-train-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c "import qdelta_jax.train" 2>/dev/null; then
    # qdelta_jax.train is the repository's train/ folder, mapped at install time.
    "$PY" -m pip install -q --no-deps -e .
fi
DATA=${DATA:-$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
STEPS=${STEPS:-200}
SEQ=${SEQ:-4096}
BPG=${BATCH_PER_GPU:-4}
RESULTS=${OUT:-runs}/train_gpu
RUNS=${RUNS:-/tmp/qdelta-train-gpu}
NGPU=$("$PY" -c 'import jax; print(jax.device_count())')

common=(--preset 340m --task text --data "$DATA" --steps "$STEPS" --seq-len "$SEQ"
        --lr 1e-3 --warmup 20 --dtype bfloat16 --eval-every 0 --eval-batches 2
        --save-every 0 --no-progress)
[[ -n "${IMPL:-}" ]] && common+=(--implementation "$IMPL")
[[ -n "${REMAT:-}" ]] && common+=(--remat)
[[ -n "${PEAK_TFLOPS:-}" ]] && common+=(--peak-tflops "$PEAK_TFLOPS")
[[ -n "${MODEL_OVERRIDES:-}" ]] && common+=(--model-overrides "$MODEL_OVERRIDES")

rm -rf "$RUNS"
mkdir -p "$RESULTS" "$RUNS"
echo "data: $DATA; $NGPU GPU(s) visible; $STEPS steps of ${BPG} x ${SEQ} tokens per GPU"

run() {  # name, number of GPUs, extra flags...
    local name=$1 n=$2
    shift 2
    local devices
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then  # the first n of the GPUs we were given
        devices=$(echo "$CUDA_VISIBLE_DEVICES" | cut -d, -f1-"$n")
    else
        devices=$(seq -s, 0 $((n - 1)))
    fi
    echo "== $name: $n GPU(s)"
    CUDA_VISIBLE_DEVICES=$devices "$PY" -m qdelta_jax.train "${common[@]}" \
        --batch-size $((n * BPG)) --run-dir "$RUNS/$name" "$@" 2>&1 | tee "$RESULTS/$name.txt"
    cp "$RUNS/$name/metrics.jsonl" "$RUNS/$name/summary.json" "$RUNS/$name/config.json" \
        "$RESULTS/" 2>/dev/null || true
    for f in metrics.jsonl summary.json config.json; do
        [[ -f "$RESULTS/$f" ]] && mv "$RESULTS/$f" "$RESULTS/$name.$f"
    done
}

for n in ${GPU_COUNTS:-1 2}; do
    if [[ "$n" -gt "$NGPU" ]]; then
        echo "only $NGPU GPU(s) visible: skipping the $n-GPU run"
    elif [[ "$n" == 1 ]]; then
        run "gpu1${TAG:-}" 1
    else
        run "gpu$n${TAG:-}" "$n" --mesh "data=$n"
    fi
done

"$PY" - "$RESULTS" <<'EOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print(f"{'run':12} {'GPUs':>4} {'step ms':>9} {'tokens/s':>12} {'MFU %':>7} {'loss':>8}")
for f in sorted(d.glob("*.summary.json")):
    s = json.loads(f.read_text())
    mfu = f"{100 * s['mfu']:.1f}" if s.get("mfu") is not None else "-"
    print(f"{f.name.split('.')[0]:12} {s['devices']:>4} {1e3 * (s['step_time_s'] or 0):>9.1f} "
          f"{s['tokens_per_s'] or 0:>12,.0f} {mfu:>7} {s['loss'] or float('nan'):>8.4f}")
EOF
