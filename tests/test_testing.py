"""qdelta_jax.testing's timer, and the Nsight Compute summary script the benchmarks use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp

from qdelta_jax.testing import time_fn


def test_time_fn_counts_its_calls():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    t = time_fn(fn, (jnp.ones(3),), warmup=2, reps=4)
    assert len(calls) == 2 + 4 and t >= 0.0
    calls.clear()
    t = time_fn(fn, (jnp.ones(3),), warmup=1, reps=3, pipelined=True)
    assert len(calls) == 1 + 5 * 3 and t >= 0.0  # 5 rounds of reps back-to-back calls


def test_ncu_summary_makes_one_row_per_kernel(tmp_path, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "ncu_summary.py"
    spec = importlib.util.spec_from_file_location("ncu_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    head = ('"ID","Kernel Name","Grid Size","Block Size","Section Name","Metric Name",'
            '"Metric Unit","Metric Value"')
    rows = [
        '"0","qdelta_state_pass","(8, 6, 4)","(128, 1, 1)","SOL","Duration","ns","254,080"',
        '"0","qdelta_state_pass","(8, 6, 4)","(128, 1, 1)","Occ","Registers Per Thread","","255"',
        '"0","qdelta_state_pass","(8, 6, 4)","(128, 1, 1)","Cmd",'
        '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","","0.9"',
        '"0","qdelta_state_pass","(8, 6, 4)","(128, 1, 1)","Cmd",'
        '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","","1.9"',
        '"1","qdelta_chunk_output","(512, 6, 1)","(128, 1, 1)","SOL","Duration","ns","157,664"',
    ]
    f = tmp_path / "ncu.csv"
    f.write_text("==PROF== Connected\n" + "\n".join([head, *rows]) + "\nprogram output\n")
    mod.summarize(str(f))
    out = capsys.readouterr().out.splitlines()
    state = next(x for x in out if "qdelta_state_pass" in x)
    assert "254,080 ns" in state and "| 255 |" in state
    assert state.index("long_scoreboard 1.9") < state.index("barrier 0.9")
    assert any("qdelta_chunk_output" in x and "157,664 ns" in x for x in out)
