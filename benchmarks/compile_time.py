"""How the training step's compile time grows with depth, per implementation of the op.

    python benchmarks/compile_time.py --impl pallas-triton pallas-mosaic --layers 2 4 8
    python benchmarks/compile_time.py --preset tiny --batch 2 --seq-len 128 --layers 1 2  # CPU

For every (implementation, number of layers, unrolled or ``scan_layers``) it builds the trainer's
340m step (as ``profile_step.py`` does: random packed text, bf16 compute, AdamW) and times
``lower`` and ``compile`` separately, and reads the lowered module: its custom calls by target
(Mosaic GPU, Triton, ...), the Mosaic GPU calls' distinct kernels (by the hash the lowering
puts in each call's configuration) and the size of the module text (the serialized kernels
are in it). A row is printed
and the JSON rewritten as soon as it is measured, so a run cut by a time limit keeps what it has.
``--compile-limit`` skips the remaining layer counts of an implementation once one compile took
longer (the next would take longer still).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_common  # noqa: E402

_CALL = re.compile(r'stablehlo\.custom_call @(\w+)')
_HASH = re.compile(r'kernel_hash = "((?:[^"\\]|\\.)*)"')


def custom_calls(text: str) -> dict:
    """Counts of the lowered module's custom calls by target, the Mosaic GPU calls' distinct
    kernel hashes and the characters of the module text (the serialized kernels are in it)."""
    targets: dict[str, int] = {}
    for t in _CALL.findall(text):
        targets[t] = targets.get(t, 0) + 1
    return {"targets": targets, "mosaic_hashes": len(set(_HASH.findall(text))),
            "module_chars": len(text)}


def measure(a, impl: str, layers: int, scan: bool) -> dict:
    overrides = f"num_hidden_layers={layers}" + (",scan_layers=true" if scan else "")
    sess, source = step_common.make_session(
        a.preset, a.batch, a.seq_len, dtype=a.dtype, implementation=impl,
        model_overrides=overrides)
    batch = step_common.batch_arrays(source, 0)
    state = sess.init_state()
    jitted = step_common.jitted_step(sess, batch)
    t0 = time.perf_counter()
    with jax.set_mesh(sess.mesh):
        lowered = jitted.lower(state, batch)
    lower_s = time.perf_counter() - t0
    calls = custom_calls(lowered.as_text())
    t0 = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t0
    return {"implementation": impl, "layers": layers, "scan_layers": scan, "lower_s": lower_s,
            "compile_s": compile_s, **calls}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="340m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impl", nargs="+", default=["pallas-triton", "pallas-mosaic"])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--scan", choices=["no", "yes", "both"], default="no",
                   help="unrolled blocks, scan_layers, or both")
    p.add_argument("--compile-limit", type=float, default=120.0,
                   help="seconds; skip an implementation's deeper steps once a compile took "
                   "longer")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if any(n < 1 for n in a.layers):
        p.error(f"--layers must be >= 1, got {a.layers}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    scans = {"no": [False], "yes": [True], "both": [False, True]}[a.scan]
    rows = []
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; {a.preset}, "
          f"{a.batch} x {a.seq_len}, {a.dtype}", flush=True)
    for impl in a.impl:
        for scan in scans:
            for layers in sorted(a.layers):
                r = measure(a, impl, layers, scan)
                rows.append(r)
                print(f"{impl:>16} {'scan' if scan else 'unrolled':>8} layers {layers:>3}: lower "
                      f"{r['lower_s']:6.1f} s, compile {r['compile_s']:7.1f} s; custom calls "
                      f"{r['targets']}, {r['mosaic_hashes']} Mosaic kernels, module "
                      f"{r['module_chars'] / 1e6:.1f} MB", flush=True)
                if a.json:
                    Path(a.json).write_text(json.dumps(rows, indent=1))
                if r["compile_s"] > a.compile_limit:
                    print(f"# {impl}: compile over {a.compile_limit:.0f} s, deeper steps skipped",
                          flush=True)
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
