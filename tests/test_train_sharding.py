"""Tests of :mod:`qdelta_jax.train.sharding`: mesh parsing, multi-host detection, and 8 host
devices (data=4, fsdp=2) computing the same losses as one device. The logical-axis sharding rules
are tested with the parameters' metadata in ``tests/test_flax_conventions.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qdelta_jax.train import sharding as shd


@pytest.mark.parametrize("spec,n,want", [
    (None, 8, {"data": 8, "fsdp": 1}),
    ("", 1, {"data": 1, "fsdp": 1}),
    ("data=4,fsdp=2", 8, {"data": 4, "fsdp": 2}),
    ("fsdp=2", 8, {"data": 4, "fsdp": 2}),
    ("data=-1,fsdp=4", 8, {"data": 2, "fsdp": 4}),
    (" data = 2 , fsdp = 1 ", 2, {"data": 2, "fsdp": 1}),
])
def test_parse_mesh(spec, n, want):
    assert shd.parse_mesh(spec, n) == want


@pytest.mark.parametrize("spec,n,msg", [
    ("data=3", 8, "3 does not divide"),
    ("data=4,fsdp=4", 8, "= 16, but there are 8"),
    ("model=2", 8, "unknown axis"),
    ("data4", 8, "expected AXIS=SIZE"),
    ("data=0", 8, ">= 1"),
    ("data=2,data=4", 8, "given twice"),
])
def test_parse_mesh_errors(spec, n, msg):
    with pytest.raises(shd.MeshError, match=msg) as e:
        shd.parse_mesh(spec, n)
    assert "--mesh" in str(e.value)


def test_distributed_detection(monkeypatch):
    calls = []
    monkeypatch.setattr(shd.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert not shd.maybe_initialize_distributed({})
    assert not shd.maybe_initialize_distributed({"SLURM_NTASKS": "1"})
    assert shd.maybe_initialize_distributed(
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"})
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                         "process_id": 1}
    assert shd.maybe_initialize_distributed({"SLURM_NTASKS": "4"})
    assert calls[-1] == {}


def _run(tmp: Path, name: str, devices: int, extra: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    run_dir = tmp / name
    # One layer of the tiny preset: it has every kind of parameter the sharding rules place, and
    # the second layer would only double the compile time of each of these subprocesses.
    argv = [sys.executable, "-m", "qdelta_jax.train", "--steps", "3", "--batch-size", "8",
            "--seq-len", "32", "--warmup", "1", "--lr", "3e-3", "--eval-every", "0",
            "--eval-batches", "1", "--save-every", "0", "--no-progress",
            "--model-overrides", "num_hidden_layers=1", "--run-dir", str(run_dir), *extra]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"on {devices} cpu" in p.stdout
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eight_devices_match_one(tmp_path):
    """Same global batch, same losses. Not bitwise: the loss and gradient sums are reduced in a
    different order across 8 shards (and fsdp gathers change XLA's fusion choices), so the
    results agree to float32 rounding, amplified slightly by three Adam steps."""
    one = _run(tmp_path, "one", 1, [])
    eight = _run(tmp_path, "eight", 8, ["--mesh", "data=4,fsdp=2"])
    assert [r["step"] for r in one] == [r["step"] for r in eight]
    for a, b in zip(one, eight, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        if a.get("split") != "eval":
            np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)


def test_pallas_on_two_devices_matches_one(tmp_path):
    """The trainer traces its steps under the mesh, so the Pallas op (interpret mode here) runs
    per device inside shard_map (qdelta_jax.ops.shard_over_batch); same losses as one device."""
    # Batch 2: one row per device is all shard_map needs; the kernels run in interpret mode here,
    # where every row costs.
    small = ["--implementation", "pallas", "--batch-size", "2"]
    one = _run(tmp_path, "one", 1, small)
    two = _run(tmp_path, "two", 2, [*small, "--mesh", "data=2"])
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)


def test_mesh_batch_mismatch_is_a_usage_error(capsys):
    from qdelta_jax.train import cli

    # one host device here: a mesh of 2 is a --mesh error, exit 2
    assert cli.main(["--mesh", "data=2", "--no-progress", "--run-dir", "/nonexistent/x"]) == 2
    assert "--mesh" in capsys.readouterr().err


def _two_cpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return env


@pytest.mark.parametrize("mesh", ["data=2", "data=1,fsdp=2"])
def test_two_cpu_devices_large_batch_does_not_hang(tmp_path, mesh):
    """Regression: on 2 host devices a batch of 128 hung in jaxlib's LAPACK trsm kernel (it
    blocks an intra-op pool worker waiting for tasks queued on the same exhausted pool) until
    XLA aborted at an all-reduce / all-to-all rendezvous. Batch 8 never reached the kernel's
    parallel path. The chunked op's solve no longer calls LAPACK on the CPU
    (xla.unit_lower_inverse)."""
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "qdelta_jax.train", "--steps", "2", "--batch-size", "128",
            "--seq-len", "32", "--warmup", "1", "--eval-every", "0", "--eval-batches", "1",
            "--save-every", "0", "--no-progress", "--mesh", mesh,
            "--model-overrides", "num_hidden_layers=1", "--run-dir", str(run_dir)]
    # A hang lasts until XLA gives up on the rendezvous; the limit only has to exceed a normal
    # run on a loaded 2-core machine, so that slowness is not reported as a hang.
    try:
        p = subprocess.run(argv, env=_two_cpu_env(), capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:  # subprocess.run SIGKILLs it (the trainer traps SIGTERM)
        pytest.fail(f"--mesh {mesh} on 2 CPU devices hung")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 cpu" in p.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") != "eval"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
