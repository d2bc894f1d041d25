set -u
bash benchmarks/gpu_install.sh $OUT/install.log >/dev/null 2>&1 || { tail $OUT/install.log; exit 1; }
nvidia-smi -L | tee $OUT/device.txt
run() { n=$1; lim=$2; shift 2; echo "== $n"; timeout $lim "$@" > $OUT/$n.log 2>&1; echo "rc=$?"; grep -v -E "Warning|warn\(" $OUT/$n.log | grep -E "^\[|^step |\| (qdelta|llama)|  qdelta|rror" | tail -25; }
run step_mosaic 230 python3 benchmarks/profile_step.py --steps 10 --profile-steps 1 --top 3 --json $OUT/step_mosaic.json
run step_triton 150 python3 benchmarks/profile_step.py --steps 10 --profile-steps 1 --top 3 --implementation pallas-triton --json $OUT/step_triton.json
run xo_long 150 python3 benchmarks/crossover.py --models qdelta --seq-lens 4096 --long-seq-lens 16384 32768 --long-batches 1 2 --out $OUT/xo_long.png --json $OUT/xo_long.json
