#!/usr/bin/env bash
# Run groups of gpu_all.sh sections on different GPUs of one host at the same time, so a lease
# of a multi-GPU machine does several measurements in parallel. Each lane is GPUS:SECTIONS:
#
#   bash benchmarks/gpu_lanes.sh 0:check 1:dev 2:decode,ops 3:recall
#   bash benchmarks/gpu_lanes.sh 0,1:train 2:recall
#
# Each lane sees only its GPUs (CUDA_VISIBLE_DEVICES) and writes $RES/laneN/ and $RES/laneN.log;
# everything is packed into $OUT/results.tgz every 20 s and at the end. Timings are compared
# only within a lane (lanes share the host's CPUs, so compile times and launch-bound numbers
# can be a little slower than on an idle host). Installs the project once, up front.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${RES:-/tmp/qdelta_gpu}
mkdir -p "$RES"
pack() { [[ -n "${OUT:-}" ]] && tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; }
bash benchmarks/gpu_install.sh "$RES/install.log" || exit 1
nvidia-smi -L | tee "$RES/device.txt"
pids=()
i=0
for lane in "$@"; do
    gpus=${lane%%:*}
    sections=${lane#*:}
    mkdir -p "$RES/lane$i"
    echo "lane$i: GPUs $gpus: ${sections//,/ }"
    CUDA_VISIBLE_DEVICES=$gpus SKIP_INSTALL=1 OUT= RES="$RES/lane$i" \
        bash benchmarks/gpu_all.sh ${sections//,/ } >"$RES/lane$i.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
done
while true; do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    pack
    [[ $alive == 0 ]] && break
    sleep 20
done
pack
for ((j = 0; j < i; j++)); do
    echo "===== lane$j"
    tail -n 40 "$RES/lane$j.log"
done
