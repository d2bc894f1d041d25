"""Device-time profile of one training step, by category.

    python benchmarks/profile_step.py                       # 340m, 4 x 4096 packed text, bf16
    python benchmarks/profile_step.py --stand-in            # the op replaced by a stand-in
    python benchmarks/profile_step.py --preset tiny --batch 2 --seq-len 128   # CPU smoke run

The step is the trainer's own (``qdelta_jax.train``: the model, AdamW with clipping, the masked
loss over packed rows with ``cu_seqlens``, buffer donation) on random token ids, compiled ahead
of time. It is timed over ``--steps`` back-to-back steps (step time and tokens/s), then
``--profile-steps`` more run under ``jax.profiler``; the trace (an XSpace protobuf) is read back
in Python with ``jax.profiler.ProfileData`` (or, where that is missing, the Chrome-format
``*.trace.json.gz`` beside it). Every device kernel (on the CPU: every XLA thunk) names the HLO
instruction it runs; the compiled module's HLO text gives that instruction's opcode, the called
fusion computation and the JAX name stack of its metadata, and the kernel goes to the first
category that matches:

==========================  ==================================================================
Q-Delta kernels             kernels whose name starts with ``qdelta_`` (the Pallas kernels)
Q-Delta op, XLA             everything else traced inside ``qdelta_rule`` (the XLA path, the
                            padding and layout work around the kernels, or the stand-in)
LM head + cross-entropy     the ``lm_head_loss`` scope of the train step (chunked head + loss)
optimizer update            the ``optimizer`` scope (gradient norm, clipping, AdamW, the skip)
copies/transposes           copy and transpose instructions and fusions, memcpy
short conv                  ``ShortConv``
projection and MLP matmuls  ``nnx.Linear`` and any other dot or GEMM
norms, gates, activations   ``RMSNorm``, ``GatedRMSNorm``, the gates, q/k L2 norm, SiLU, SwiGLU
rest                        everything else (embedding, residual adds, ...)
==========================  ==================================================================

The scopes of the layers are added only while the step is traced here (the layer classes'
methods are wrapped in ``jax.named_scope``; nothing is computed differently). ``--stand-in``
replaces the op by an elementwise function of the same inputs and output (see
``step_common.scoped_op``), so the table then shows the step around the op. Device time is the
sum of kernel durations (kernels on concurrent streams each count), per step; the largest
kernels are listed after the table. ``--json PATH`` writes everything.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_common  # noqa: E402

CATEGORIES = (
    "Q-Delta kernels",
    "Q-Delta op, XLA",
    "LM head + cross-entropy",
    "optimizer update",
    "copies/transposes",
    "short conv",
    "projection and MLP matmuls",
    "norms, gates, activations",
    "rest",
)

# Control flow runs other instructions (which are events of their own): not counted itself.
_CONTROL = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_DOT = {"dot", "convolution", "ragged-dot", "scaled-dot"}
_COPY = {"copy", "transpose", "copy-start", "copy-done", "bitcast-convert"}


# ------------------------------------------------------------------------------ named scopes


@contextlib.contextmanager
def layer_scopes():
    """Wraps the layers' methods in named scopes while the step is traced."""
    from flax import nnx

    from qdelta_jax import layers, model, reference

    targets = [
        (layers.ShortConv, "__call__", "short_conv"),
        (layers.RMSNorm, "__call__", "norm"),
        (layers.GatedRMSNorm, "__call__", "norm"),
        (layers.QDelta, "_gates", "gates"),
        (layers.QDelta, "_qkv", "qkv"),
        (model.SwiGLU, "__call__", "mlp"),
        (nnx.Linear, "__call__", "linear"),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    l2 = reference.l2_normalize

    def scoped(fn, scope):
        def wrapper(*args, **kwargs):
            with jax.named_scope(scope):
                return fn(*args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", "wrapped")
        return wrapper

    try:
        for (obj, name, scope), (_, _, fn) in zip(targets, saved, strict=True):
            setattr(obj, name, scoped(fn, scope))
        reference.l2_normalize = scoped(l2, "norm")
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        reference.l2_normalize = l2


# ------------------------------------------------------------------------------ HLO text


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=(){}]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_BODIES = re.compile(r"(?:body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)")


def parse_hlo(text: str) -> tuple[dict, str | None]:
    """``({instruction: info}, module name)`` from an HLO module's text; ``info`` holds the
    opcode, the op_name metadata, the called computation, whether it is or calls a matmul."""
    instrs: dict[str, dict] = {}
    comps: dict[str, dict] = collections.defaultdict(lambda: {"dot": False, "root": ""})
    module = None
    comp = None
    for line in text.splitlines():
        if line.startswith("HloModule "):
            module = line.split()[1].rstrip(",")
            continue
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _INSTR.match(line)
        if m is None or comp is None:
            continue
        name, rest = m.groups()
        op = _OPCODE.search(" " + rest)
        opcode = op.group(1) if op else ""
        op_name = _OPNAME.search(rest)
        calls = _CALLS.search(rest)
        target = _TARGET.search(rest)
        is_dot = opcode in _DOT or bool(
            target and re.search(r"gemm|matmul|cublas|cudnn\$conv", target.group(1), re.I))
        info = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "",
                "calls": calls.group(1) if calls else None, "dot": is_dot, "comp": comp,
                "bodies": _BODIES.findall(rest) if opcode in _CONTROL else []}
        instrs[name] = info
        if is_dot:
            comps[comp]["dot"] = True
        if line.lstrip().startswith("ROOT"):
            comps[comp]["root"] = opcode
            comps[comp]["root_op_name"] = info["op_name"]
    # Instructions a scan adds in its loop body (stacking its outputs, its counter) carry no
    # metadata: they take the name stack of the loop that runs them.
    context: dict[str, str] = {}
    for _ in range(8):  # nesting depth of loops
        for info in instrs.values():
            own = info["op_name"] or context.get(info["comp"], "")
            for body in info["bodies"]:
                if own and not context.get(body):
                    context[body] = own
    for info in instrs.values():
        if not info["op_name"]:
            info["op_name"] = context.get(info["comp"], "")
        called = comps.get(info["calls"]) if info["calls"] else None
        if called is not None:
            info["dot"] = info["dot"] or called["dot"]
            info["root"] = called["root"]
            if not info["op_name"]:
                info["op_name"] = called.get("root_op_name", "")
    return instrs, module


def _has_scope(op_name: str, scope: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(scope)}(?![\w])", op_name) is not None


def categorize(kernel: str, info: dict | None) -> str:
    """The category of a kernel (see the module docstring)."""
    if kernel.startswith("qdelta_"):
        return "Q-Delta kernels"
    info = info or {}
    op_name = info.get("op_name", "")
    if _has_scope(op_name, "qdelta_op"):
        return "Q-Delta op, XLA"
    if _has_scope(op_name, "lm_head_loss"):
        return "LM head + cross-entropy"
    if _has_scope(op_name, "optimizer"):
        return "optimizer update"
    low = kernel.lower()
    if (info.get("opcode") in _COPY or info.get("root") in _COPY or "memcpy" in low
            or "memset" in low or low.startswith(("copy", "transpose"))):
        return "copies/transposes"
    if _has_scope(op_name, "short_conv"):
        return "short conv"
    if info.get("dot") or _has_scope(op_name, "linear"):
        return "projection and MLP matmuls"
    if any(_has_scope(op_name, s) for s in ("norm", "gates", "mlp", "qkv")):
        return "norms, gates, activations"
    return "rest"


# ------------------------------------------------------------------------------ the trace


def _pick(device_lines: dict, host: list):
    """Device kernels from the raw stream lines (the derived ``XLA Ops`` line repeats them; it
    is used only where no stream line exists), else the host's XLA thunks (the CPU)."""
    streams = [evs for (_, line), evs in device_lines.items()
               if line.lower().startswith("stream")]
    if not streams:
        streams = [evs for (_, line), evs in device_lines.items() if line == "XLA Ops"]
    events = [e for evs in streams for e in evs]
    return events if events else host


def _xplane_events(path: str):
    """``(kernel name, hlo_op, hlo_module, seconds)`` of every device kernel or, with no
    device plane, of every host XLA thunk."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    device: dict[tuple, list] = collections.defaultdict(list)
    host = []
    for plane in data.planes:
        is_device = plane.name.startswith("/device:")
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                hlo_op = stats.get("hlo_op")
                if not is_device and hlo_op is None:
                    continue
                rec = (ev.name, hlo_op, stats.get("hlo_module"), ev.duration_ns * 1e-9)
                if is_device:
                    device[(plane.name, line.name)].append(rec)
                else:
                    host.append(rec)
    return _pick(device, host)


def _chrome_events(path: str):
    """The same from a Chrome-format ``*.trace.json.gz``."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pnames = {e["pid"]: e.get("args", {}).get("name", "") for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"}
    tnames = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device: dict[tuple, list] = collections.defaultdict(list)
    host = []
    for e in events:
        if e.get("ph") != "X":
            continue
        args = e.get("args", {})
        is_device = str(pnames.get(e.get("pid"), "")).startswith("/device:")
        if not is_device and "hlo_op" not in args:
            continue
        rec = (e["name"], args.get("hlo_op"), args.get("hlo_module"), e.get("dur", 0) * 1e-6)
        if is_device:
            device[(e["pid"], str(tnames.get((e["pid"], e.get("tid")), "")))].append(rec)
        else:
            host.append(rec)
    return _pick(device, host)


def read_trace(trace_dir: str):
    xplanes = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if xplanes:
        try:
            return _xplane_events(xplanes[-1])
        except ImportError:
            pass
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not traces:
        raise SystemExit(f"no trace found under {trace_dir}")
    return _chrome_events(traces[-1])


def summarize(events, instrs: dict, module: str | None, n_steps: int):
    """``(per-category seconds per step, per-category kernels per step, top kernels, seconds
    per step of kernels naming no instruction of the module)`` of the events of ``module``."""
    mine = [e for e in events if module is not None and e[2] == module]
    if not mine:  # the module name is not recorded on every backend
        mine = [e for e in events if e[1] is not None and e[1] in instrs] or events
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    calls = dict.fromkeys(CATEGORIES, 0.0)
    per_kernel: dict[tuple[str, str], list] = {}
    for name, hlo_op, _, seconds in mine:
        info = instrs.get(hlo_op) if hlo_op else None
        if info is not None and info["opcode"] in _CONTROL:
            continue
        cat = categorize(name, info)
        per_cat[cat] += seconds / n_steps
        calls[cat] += 1 / n_steps
        key = (name if name.startswith("qdelta_") or hlo_op is None else hlo_op, cat)
        acc = per_kernel.setdefault(key, [0.0, 0])
        acc[0] += seconds / n_steps
        acc[1] += 1
    top = sorted(((k[0], k[1], v[0], v[1] / n_steps) for k, v in per_kernel.items()),
                 key=lambda r: -r[2])
    unmapped = sum(e[3] for e in mine if not e[1] or e[1] not in instrs) / n_steps
    return per_cat, calls, top, unmapped


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="340m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--implementation", default=None, help="Q-Delta op (default: fastest here)")
    p.add_argument("--model-overrides", default=None, help="e.g. scan_layers=true")
    p.add_argument("--unpacked", action="store_true", help="rows without document boundaries")
    p.add_argument("--stand-in", action="store_true",
                   help="replace the op by an elementwise stand-in of the same inputs and output")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="profiled steps (0: time the step only, no profile and no table)")
    p.add_argument("--top", type=int, default=15, help="largest kernels to list")
    p.add_argument("--trace-dir", default=None, help="where the trace goes (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results to this file")
    a = p.parse_args(argv)
    for flag in ("batch", "seq_len", "steps"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.profile_steps < 0:
        p.error(f"--profile-steps must be >= 0, got {a.profile_steps}")
    return a


def progress(t_start: float, what: str) -> None:
    print(f"[{time.perf_counter() - t_start:6.1f} s] {what}", file=sys.stderr, flush=True)


def run(a) -> dict:
    t_start = time.perf_counter()
    packed = not a.unpacked
    sess, source = step_common.make_session(
        a.preset, a.batch, a.seq_len, dtype=a.dtype, param_dtype=a.param_dtype,
        implementation=a.implementation, model_overrides=a.model_overrides, packed=packed)
    batches = [step_common.batch_arrays(source, i, packed) for i in range(2)]
    state = sess.init_state()
    progress(t_start, "compiling the step")
    with step_common.scoped_op(a.stand_in), layer_scopes():
        compiled, compile_s = step_common.compile_step(sess, state, batches[0])
    instrs, module = parse_hlo(compiled.as_text())
    progress(t_start, f"compiled in {compile_s:.1f} s; timing {a.steps} steps")

    state, _, _ = step_common.time_steps(compiled, state, batches, 2)  # warm-up
    state, step_s, metrics = step_common.time_steps(compiled, state, batches, a.steps)
    loss = float(metrics["loss"])
    tokens = a.batch * a.seq_len
    timing = {
        "preset": a.preset, "batch": a.batch, "seq_len": a.seq_len, "dtype": a.dtype,
        "param_dtype": a.param_dtype, "implementation": a.implementation,
        "model_overrides": a.model_overrides, "packed": packed, "stand_in": a.stand_in,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "loss": loss, "memory": step_common.memory_analysis(compiled),
        "peak_bytes": step_common.peak_bytes(),
    }
    if not a.profile_steps:
        progress(t_start, f"step {step_s * 1e3:.1f} ms")
        return {**timing, "wall_s": time.perf_counter() - t_start}
    progress(t_start, f"step {step_s * 1e3:.1f} ms; profiling {a.profile_steps} steps")

    trace_dir = a.trace_dir or tempfile.mkdtemp(prefix="qdelta-profile-")
    try:
        from jax.profiler import ProfileData  # noqa: F401
        chrome = False
    except ImportError:  # read the Chrome-format trace instead
        chrome = True
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=chrome)
    try:
        state, _, _ = step_common.time_steps(compiled, state, batches, a.profile_steps)
    finally:
        jax.profiler.stop_trace()
    progress(t_start, "reading the trace")
    per_cat, calls, top, unmapped = summarize(read_trace(trace_dir), instrs, module,
                                              a.profile_steps)
    return {
        **timing, "device_s_per_step": sum(per_cat.values()),
        "categories_s": per_cat, "categories_calls": calls, "unmapped_s_per_step": unmapped,
        "top_kernels": [{"kernel": k, "category": c, "s_per_step": s, "calls_per_step": n}
                        for k, c, s, n in top[: a.top]],
        "trace_dir": trace_dir, "wall_s": time.perf_counter() - t_start,
    }


def format_table(r: dict) -> str:
    mode = "stand-in op" if r["stand_in"] else f"op {r['implementation'] or 'default'}"
    head = [
        f"{r['preset']}, {r['batch']} x {r['seq_len']} {'packed' if r['packed'] else 'unpacked'}"
        f" random text, {r['dtype']} compute, {r['param_dtype']} params, {mode}"
        f"{', ' + r['model_overrides'] if r['model_overrides'] else ''}, on "
        f"{r['device']} (jax {r['jax']})",
        f"step {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s (compile "
        f"{r['compile_s']:.1f} s)",
    ]
    if "categories_s" not in r:  # --profile-steps 0: timed only
        return "\n".join(head)
    total = r["device_s_per_step"] or 1.0
    lines = [
        head[0],
        f"{head[1]}; device time {total * 1e3:.1f} ms per step, of which "
        f"{r['unmapped_s_per_step'] * 1e3:.1f} ms in kernels naming no HLO instruction of the "
        "step (categorised by kernel name only)",
        "",
        "| category | ms / step | share | kernels / step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for cat in CATEGORIES:
        s = r["categories_s"][cat]
        lines.append(f"| {cat} | {s * 1e3:.2f} | {100 * s / total:.1f}% | "
                     f"{r['categories_calls'][cat]:.0f} |")
    lines.append(f"| total device time | {total * 1e3:.2f} | 100% | "
                 f"{sum(r['categories_calls'].values()):.0f} |")
    lines += ["", "| kernel / HLO op | category | ms / step | calls / step |",
              "| --- | --- | ---: | ---: |"]
    for k in r["top_kernels"]:
        lines.append(f"| {k['kernel'][:60]} | {k['category']} | {k['s_per_step'] * 1e3:.3f} | "
                     f"{k['calls_per_step']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse_args(argv)
    r = run(a)
    print(format_table(r))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main()
