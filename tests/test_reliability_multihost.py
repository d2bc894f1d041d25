"""Multi-host on the CPU: two processes (``jax.distributed`` on localhost, two host devices
each) train a few steps with the losses of one process, save, and resume; each process reads only
its half of every global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qdelta_jax.train import cli

ARGS = ["--steps", "4", "--batch-size", "8", "--seq-len", "32", "--save-every", "2",
        "--eval-every", "0", "--eval-batches", "1", "--warmup", "2", "--no-progress"]

# Trains through the CLI, then checks the rows this process reads against the global batch.
DRIVER = r"""
import json, sys
import numpy as np
from qdelta_jax.train import cli
rc = cli.main(sys.argv[1:])
import jax
from jax.experimental import multihost_utils
from qdelta_jax.train import data as D, sharding as shd
mesh = shd.make_mesh(None)
src = D.make_source("mqar", batch_size=8, seq_len=32, seed=0, num_pairs=4, mqar_vocab=64)
rows = shd.process_rows(mesh, 8)
local = src.batch(3, rows)
whole = multihost_utils.process_allgather(shd.shard_batch(local, mesh, rows, 8)["inputs"],
                                          tiled=True)
print(json.dumps({"rc": rc, "process": jax.process_index(), "devices": jax.device_count(),
                  "rows": rows.tolist(), "local_rows": len(local["inputs"]),
                  "same": bool(np.array_equal(np.asarray(whole), src.batch(3)["inputs"]))}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir: Path, extra: list[str], cache: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COMPILATION_CACHE_DIR": cache,
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", DRIVER, *ARGS, "--run-dir", str(run_dir), *extra], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[dict]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def launch(run_dir: Path, extra: list[str], cache: str) -> list[dict]:
    return finish(start(run_dir, extra, cache))


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r.get("split") != "eval"}


def test_two_processes_train_save_resume_like_one(tmp_path, xla_cache):
    one = tmp_path / "one"
    assert cli.main(ARGS + ["--run-dir", str(one)]) == 0

    two = tmp_path / "two"
    first = launch(two, ["--stop-after", "2"], xla_cache)
    assert [o["process"] for o in first] == [0, 1] and all(o["devices"] == 4 for o in first)
    assert [o["rows"] for o in first] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(o["local_rows"] == 4 and o["same"] for o in first), "each reads its half only"
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert sorted(losses(two)) == [1, 2]

    second = launch(two, [], xla_cache)
    assert all(o["rc"] == 0 for o in first + second)
    got, want = losses(two), losses(one)
    assert sorted(got) == [1, 2, 3, 4], "resumed, each step once"
    # Four devices against one: the same function, reductions in another order.
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                               rtol=2e-5)


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path, xla_cache):
    run = tmp_path / "pre"
    procs = start(run, ["--steps", "100000", "--save-every", "0"], xla_cache)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            m = run / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 2:
                break
            assert all(p.poll() is None for p in procs), procs[0].communicate()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # a preemption notice to one host only
        outs = finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(o["rc"] == 0 for o in outs)
    last = max(losses(run))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [last], "both processes stopped after the same step and saved it"
