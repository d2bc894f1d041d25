"""The command line: ``python -m experiments.recall [--quick | --smoke] [options]`` from the
repository root (``--help`` lists the options)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from . import __doc__ as _package_doc
from .experiment import run_experiment
from .models import DEFAULT_IMPLEMENTATION, VARIANTS
from .profiles import PROFILES
from .report import PROGRAM, observations, tables, write_docs
from .tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGRAM, description=_package_doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CPU-sized profile (1-2 minutes)")
    g.add_argument("--smoke", action="store_true", help="seconds-long end-to-end check")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="wall-time budget in minutes, compilation included; sets the number of "
                        "steps (default: full 5, quick 2)")
    p.add_argument("--max-steps", type=int, help="cap on the number of steps (profile default)")
    p.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--tasks", help="comma-separated subset of mqar, niah")
    p.add_argument("--implementation", default="default",
                   help="Q-Delta op implementation: xla, pallas, reference, auto (the library's "
                        "choice: pallas on GPUs), or default: xla (the chunked jnp path: quick "
                        "to compile)")
    p.add_argument("--out", default="out/recall", help="folder for recall.json (default "
                                                       "out/recall)")
    p.add_argument("--docs", default=str(ROOT / "docs"),
                   help="folder for RESULTS.md and the PNGs (default docs/)")
    p.add_argument("--device-note", help="how to name the device in RESULTS.md, e.g. 'H100 80GB'")
    p.add_argument("--from-json", help="re-render the docs from a saved recall.json; no training")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack
        faulthandler.register(signal.SIGUSR1)
    command = f"{PROGRAM} " + " ".join(shlex.quote(x) for x in (
        argv if argv is not None else sys.argv[1:]))

    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        if a.device_note:
            res["meta"]["device_note"] = a.device_note
        path = write_docs(res, Path(a.docs), Path(a.from_json), res["meta"].get("command",
                                                                                 command))
        print(f"[recall] wrote {path}")
        return 0

    prof = PROFILES["quick" if a.quick else "smoke" if a.smoke else "full"]
    over: dict[str, Any] = {}
    if a.max_steps:
        over["max_steps"] = a.max_steps
        over["min_steps"] = min(prof.min_steps, a.max_steps)
    if a.variants:
        vs = tuple(x.strip() for x in a.variants.split(",") if x.strip())
        bad = [x for x in vs if x not in VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
        over["variants"] = vs
    if a.tasks:
        ts = tuple(x.strip() for x in a.tasks.split(",") if x.strip())
        if not ts or any(x not in TASKS for x in ts):
            p.error(f"--tasks: choose from {', '.join(TASKS)}")
        over["tasks"] = ts
    prof = dataclasses.replace(prof, **over)
    budget = a.budget_minutes if a.budget_minutes is not None else prof.budget_minutes
    impl = None if a.implementation == "auto" else a.implementation
    if impl == "default":
        impl = DEFAULT_IMPLEMENTATION

    res = run_experiment(prof, budget_minutes=budget, implementation=impl)
    res["meta"]["command"] = command
    if a.device_note:
        res["meta"]["device_note"] = a.device_note
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "recall.json"
    json_path.write_text(json.dumps(res, indent=1))
    print(f"[recall] wrote {json_path}")
    for task, tab in tables(res).items():
        print(f"\n{task} ({'recall accuracy' if task == 'mqar' else 'exact match'}, %):\n{tab}")
    for n_ in observations(res):
        print(f"- {n_}")
    path = write_docs(res, Path(a.docs), json_path, command)
    print(f"[recall] wrote {path}; total {res['meta']['wall_s']:.0f} s before docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
