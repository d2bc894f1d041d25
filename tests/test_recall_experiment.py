"""End-to-end check of ``experiments/recall.py``: its smallest setting trains, writes valid JSON,
a RESULTS.md and PNG plots; the docs re-render from the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "recall.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    proc = subprocess.run(
        # A budget far above the smoke's few seconds: on a loaded machine the default one cut the
        # run short of the profile's steps, which the test checks were all run.
        [sys.executable, str(SCRIPT), "--smoke", "--budget-minutes", "30", "--out", str(out),
         "--docs", str(out), "--device-note", "test CPU"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_writes_json(smoke):
    out, stdout = smoke
    res = json.loads((out / "recall.json").read_text())
    meta = res["meta"]
    assert meta["steps"] == meta["profile"]["max_steps"]
    variants = set(meta["variants"])
    assert variants == {"qdelta", "gdn"}
    runs = res["runs"]
    n_settings = len(meta["profile"]["mqar_settings"])
    assert len(runs) == len(variants) * n_settings * len(meta["profile"]["seeds"])
    for r in runs:
        assert set(r) >= {"variant", "task", "setting", "seed", "accuracy", "loss_curve", "wall_s"}
        assert 0.0 <= r["accuracy"] <= 1.0
        assert len(r["loss_curve"]["step"]) == len(r["loss_curve"]["loss"]) >= 1
        assert all(x == x for x in r["loss_curve"]["loss"])  # no NaN
    # The loss went down over the few smoke steps (every variant, mean over seeds and settings).
    for v in variants:
        curves = [r["train_loss_curve_all_settings"] for r in runs if r["variant"] == v]
        assert sum(c[-1] for c in curves) < sum(c[0] for c in curves)
    diag = res["diagnostics"]["qdelta"]["mqar"]["overall"]
    assert diag["outside"] == 0.0  # beta, lam in (0, 1): never outside (0, 2)
    assert "recall accuracy" in stdout


def test_smoke_writes_docs_and_pngs(smoke):
    out, _ = smoke
    md = (out / "RESULTS.md").read_text()
    assert "## Final recall" in md and "test CPU" in md and "smoke" in md
    assert "Stability diagnostic" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "recall_mqar_vs_length.png" in pngs and "recall_loss_curves.png" in pngs
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_docs_rerender_from_json(smoke, tmp_path):
    out, _ = smoke
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-json", str(out / "recall.json"), "--docs",
         str(tmp_path), "--device-note", "re-rendered"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-rendered" in (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "recall_loss_curves.png").exists()
