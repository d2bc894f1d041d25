"""Condense ``ncu --csv --page details`` output (benchmarks/ncu_profile.sh) to one row per kernel.

    python3 benchmarks/ncu_summary.py ncu_pallas.csv [more.csv ...]
"""

from __future__ import annotations

import csv
import sys

COLUMNS = [
    ("Duration", "time"),
    ("DRAM Throughput", "dram%"),
    ("Compute (SM) Throughput", "sm%"),
    ("Registers Per Thread", "regs"),
    ("Dynamic Shared Memory Per Block", "dsmem"),
    ("Theoretical Occupancy", "th.occ%"),
    ("Achieved Occupancy", "occ%"),
    ("Warp Cycles Per Issued Instruction", "cyc/issue"),
]
STALL_PREFIX = "smsp__average_warps_issue_stalled_"


def summarize(path: str) -> None:
    rows: dict[tuple[str, str], dict[str, str]] = {}
    order: list[tuple[str, str]] = []
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    for r in csv.DictReader(lines):
        key = (r["ID"], r["Kernel Name"][:40])
        if key not in rows:
            rows[key] = {"grid": r.get("Grid Size", ""), "block": r.get("Block Size", "")}
            order.append(key)
        name, unit, val = r["Metric Name"], r.get("Metric Unit", ""), r["Metric Value"]
        rows[key][name] = f"{val} {unit}".strip() if name == "Duration" else val
    print(f"## {path}")
    head = ["id", "kernel", "grid", "block"] + [c for _, c in COLUMNS] + ["top stalls"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for key in order:
        m = rows[key]
        stalls = sorted(
            ((float(v.replace(",", "")), n[len(STALL_PREFIX):].split("_per_")[0])
             for n, v in m.items() if n.startswith(STALL_PREFIX) and v not in ("", "n/a")),
            reverse=True,
        )[:4]
        cells = [key[0], key[1], m["grid"], m["block"]] + [m.get(n, "-") for n, _ in COLUMNS]
        cells.append(", ".join(f"{n} {v:.1f}" for v, n in stalls))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summarize(p)
