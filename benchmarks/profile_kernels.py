"""One forward (+ backward) of the op, for a kernel profiler (Nsight Compute) to read.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section LaunchStats --section Occupancy --section WarpStateStats \
        python3 benchmarks/profile_kernels.py --impl pallas
    ncu ... python3 benchmarks/profile_kernels.py --impl fla     # the authors' base, forward

The script compiles and runs the function ``--warmup`` times (fla's autotuning happens there),
then runs it once between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that with
``--profile-from-start off`` the profiler sees exactly one call's kernels. Inputs are fresh
random arrays at the 340M layer shape unless ``--shape`` says otherwise. Without a profiler
attached it just prints the wall time of the profiled call (a smoke test, not a benchmark:
``benchmarks/ops.py`` times).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__)))


def cuda_profiler():
    """``(start, stop)`` of the CUDA runtime's profiler API, found through torch when it is
    installed (it loads libcudart), else through ctypes."""
    try:
        import torch

        torch.cuda.init()
        return torch.cuda.profiler.start, torch.cuda.profiler.stop
    except Exception:  # noqa: BLE001 - no torch: the runtime library directly
        name = ctypes.util.find_library("cudart")
        if name is None:
            return (lambda: None), (lambda: None)
        lib = ctypes.CDLL(name)
        return lib.cudaProfilerStart, lib.cudaProfilerStop


def pallas_fn(shape, dtype, backward: bool, save_residuals: bool):
    import jax
    from ops import op_functions

    from qdelta_jax.pallas import Config

    # save_residuals off: the backward recomputes W, T, h_in, D
    (_, fwd, fwd_args), (_, fwd_bwd, bwd_args) = op_functions(
        "pallas", shape, dtype, config=None if save_residuals else Config(save_residuals=False))
    f, args = (jax.jit(fwd_bwd), bwd_args) if backward else (jax.jit(fwd), fwd_args)
    return lambda: jax.block_until_ready(f(*args))


def fla_fn(shape):
    import torch
    from ops import fla_forward

    run = fla_forward(shape)

    def run_and_wait():
        run()
        torch.cuda.synchronize()

    return run_and_wait


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("pallas", "fla"), default="pallas")
    p.add_argument("--shape", default="8x4096x6x128x256", help="BxTxHxKxV")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--forward-only", action="store_true", help="pallas: no backward")
    p.add_argument("--no-save-residuals", dest="save_residuals", action="store_false",
                   help="pallas: save_residuals off (the backward recomputes W, T, h_in, D)")
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    from qdelta_jax.testing import parse_shape

    shape = parse_shape(a.shape)
    start, stop = cuda_profiler()
    if a.impl == "fla":
        run = fla_fn(shape)
    else:
        import jax.numpy as jnp

        run = pallas_fn(shape, jnp.dtype(a.dtype), not a.forward_only, a.save_residuals)
    for _ in range(a.warmup):
        run()
    start()
    t0 = time.perf_counter()
    run()
    dt = time.perf_counter() - t0
    stop()
    print(f"{a.impl} {a.shape} {a.dtype}: profiled call {dt * 1e3:.2f} ms wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
