"""Tests of :mod:`qdelta_jax.train.checkpoint` through the real CLI on the tiny QDeltaLM: exact
resume, keep-last-3, fallback from a damaged checkpoint, clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train import cli

BASE = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--save-every", "1",
        "--eval-every", "0", "--eval-batches", "1", "--warmup", "2", "--lr", "3e-3",
        "--no-progress"]


pytestmark = pytest.mark.usefixtures("xla_cache")


def train_losses(run_dir) -> dict[int, float]:
    out = {}
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert "step" in rec and "loss" in rec
        if rec.get("split") != "eval":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """An uninterrupted 6-step run, a checkpoint after every step."""
    d = tmp_path_factory.mktemp("ckpt") / "A"
    assert cli.main(BASE + ["--run-dir", str(d)]) == 0
    return d


def test_resume_equals_uninterrupted(run_a, tmp_path, capsys):
    b = tmp_path / "B"
    assert cli.main(BASE + ["--run-dir", str(b), "--stop-after", "3"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 3/6" in out and "resume with" in out
    assert sorted(train_losses(b)) == [1, 2, 3]
    assert cli.main(BASE + ["--run-dir", str(b)]) == 0
    assert "resumed" in capsys.readouterr().out
    a_losses, b_losses = train_losses(run_a), train_losses(b)
    assert sorted(a_losses) == list(range(1, 7))
    assert b_losses == a_losses, "resumed losses must equal the uninterrupted run's exactly"


def test_keeps_last_three(run_a):
    assert sorted(int(p.name) for p in (run_a / "checkpoints").iterdir()
                  if p.name.isdigit()) == [4, 5, 6]
    cfg = json.loads((run_a / "config.json").read_text())
    assert cfg["model"]["num_hidden_layers"] == 2 and cfg["train"]["steps"] == 6


def _damage(step_dir: Path) -> None:
    """Cuts the largest array file of a step in half, as a write cut off mid-way would."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    big = max(files, key=lambda p: p.stat().st_size)
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])


def test_damaged_checkpoint_falls_back(run_a, tmp_path):
    c = tmp_path / "C"
    shutil.copytree(run_a, c)
    _damage(c / "checkpoints" / "6")
    shutil.rmtree(c / "checkpoints" / "5" / "state")  # and one with missing files
    with pytest.warns(ckpt.CheckpointFallbackWarning, match="step 6") as rec:
        assert cli.main(BASE + ["--run-dir", str(c)]) == 0
    assert any("step 5" in str(w.message) for w in rec)
    moved = sorted(p.name.split("-")[0] for p in (c / "corrupt").iterdir())
    assert moved == ["5", "6"], "damaged steps are moved aside, never deleted"
    # resumed from step 4: steps 5 and 6 recomputed, equal to the uninterrupted run, each
    # once in metrics.jsonl (the first attempt's lines moved to superseded/)
    steps = [json.loads(x)["step"] for x in (c / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("split") != "eval"]
    assert steps == list(range(1, 7))
    assert train_losses(c) == train_losses(run_a)
    assert len(list((c / "superseded").glob("metrics-*.jsonl"))) == 1


def test_every_checkpoint_damaged_is_an_error(run_a, tmp_path, capsys):
    c = tmp_path / "C"
    shutil.copytree(run_a, c)
    for s in ("4", "5", "6"):
        _damage(c / "checkpoints" / s)
    with pytest.warns(ckpt.CheckpointFallbackWarning):
        assert cli.main(BASE + ["--run-dir", str(c)]) == 2
    assert "could be restored" in capsys.readouterr().err


def test_sigterm_saves_and_exits_cleanly(tmp_path, xla_cache):
    d = tmp_path / "S"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": xla_cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "qdelta_jax.train", "--steps", "100000", "--batch-size", "4",
            "--seq-len", "32", "--save-every", "0", "--eval-every", "0", "--no-progress",
            "--run-dir", str(d)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 240
        metrics = d / "metrics.jsonl"
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted at step" in out and "resume with" in out
    assert "Traceback" not in err
    last = max(train_losses(d))
    steps = sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [last], "the step reached when the signal came is saved"
