"""Step time (and compile time) of the 340m step, for one implementation / override set.
   python benchmarks/results/2026-12-01c-h200/steptime.py IMPL [OVERRIDES] [--stand-in]"""
import argparse
import json
import sys
import time

sys.path.insert(0, "benchmarks")
import step_common as sc

p = argparse.ArgumentParser()
p.add_argument("impl")
p.add_argument("overrides", nargs="?", default=None)
p.add_argument("--stand-in", action="store_true")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=4096)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--unpacked", action="store_true")
a = p.parse_args()
impl = None if a.impl == "default" else a.impl
t0 = time.perf_counter()
sess, source = sc.make_session("340m", a.batch, a.seq, implementation=impl,
                               model_overrides=a.overrides or None, packed=not a.unpacked)
batches = [sc.batch_arrays(source, i, not a.unpacked) for i in range(2)]
state = sess.init_state()
with sc.scoped_op(a.stand_in):
    compiled, cs = sc.compile_step(sess, state, batches[0])
state, _, _ = sc.time_steps(compiled, state, batches, 2)
ts = []
for _ in range(3):
    state, s, m = sc.time_steps(compiled, state, batches, a.steps)
    ts.append(s)
ts.sort()
r = dict(impl=a.impl, overrides=a.overrides, stand_in=a.stand_in, compile_s=round(cs, 1),
         step_ms=round(ts[1] * 1e3, 2), tok_s=round(a.batch * a.seq / ts[1]),
         loss=float(m["loss"]), wall=round(time.perf_counter() - t0, 1))
print("RESULT", json.dumps(r), flush=True)
