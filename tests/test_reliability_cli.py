"""CLI semantics: a rerun with only ``--run-dir`` reuses the saved options (flags given again
override them, with a warning), no duplicate steps in ``metrics.jsonl`` after a resume, config
values checked like flags, ``--data`` only with ``--task text``, ``qdelta-eval`` option checks."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train import cli, evaluate, trainer

BASE = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--save-every", "2",
        "--eval-every", "0", "--eval-batches", "1", "--warmup", "2", "--lr", "2e-3",
        "--no-progress"]

pytestmark = pytest.mark.usefixtures("xla_cache")


def saved_run(tmp_path, **train):
    run = tmp_path / "run"
    a = trainer.TrainArgs(**train).resolved()
    cfg = trainer.model_config_for(a, a.mqar_vocab, False).to_dict()
    ckpt.write_run_config(run, {"model": cfg, "train": dataclasses.asdict(a)})
    return run


def test_rerun_with_only_run_dir_reuses_saved_options(tmp_path):
    run = saved_run(tmp_path, steps=7, lr=1e-3, batch_size=8, seq_len=48, stop_after=2)
    warned = []
    a = cli.parse_args(["--run-dir", str(run)], warn=warned.append)
    assert (a.steps, a.lr, a.batch_size, a.seq_len) == (7, 1e-3, 8, 48)
    assert a.stop_after is None, "per-invocation options are not reused"
    assert warned == []


def test_flags_given_again_override_with_a_warning(tmp_path):
    run = saved_run(tmp_path, steps=7, lr=1e-3)
    warned = []
    a = cli.parse_args(["--run-dir", str(run), "--lr", "5e-4", "--steps", "7"],
                       warn=warned.append)
    assert (a.lr, a.steps) == (5e-4, 7)
    assert len(warned) == 1 and "--lr 0.0005 (saved 0.001)" in warned[0]
    assert "--steps" not in warned[0], "an unchanged value is no override"


@pytest.mark.parametrize("value", [2.5, "2.5", True, "many"])
def test_config_values_are_checked_like_flags(tmp_path, value, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"steps": value}))
    with pytest.raises(trainer.UsageError, match="bad value for 'steps'"):
        cli.parse_args(["--config", str(p)])
    assert cli.parse_args(["--config", str(_write(tmp_path, {"steps": 3.0}))]).steps == 3
    with pytest.raises(SystemExit):
        cli.parse_args(["--steps", "2.5"])


def _write(tmp_path, obj):
    p = tmp_path / "ok.json"
    p.write_text(json.dumps(obj))
    return p


def test_data_without_task_text_is_refused(tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("x" * 100)
    assert cli.main(["--data", str(f), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: --data is only read by --task text" in err


@pytest.mark.parametrize("argv, flag", [
    (["--seq-lens", "0"], "--seq-lens"), (["--seq-lens", ","], "--seq-lens"),
    (["--depths", "1.5"], "--depths"), (["--batches", "0"], "--batches"),
])
def test_eval_option_checks(tmp_path, capsys, argv, flag):
    assert evaluate.main([str(tmp_path), *argv]) == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_resume_after_a_kill_has_no_duplicate_steps(tmp_path, capsys):
    run = tmp_path / "r"
    assert cli.main(BASE + ["--run-dir", str(run)]) == 0
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # a kill after step 4's metrics but before its checkpoint was complete
    shutil.rmtree(run / "checkpoints" / "4")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0')  # and a line cut off mid-write
    capsys.readouterr()
    assert cli.main(["--run-dir", str(run)]) == 0  # only --run-dir: the saved options
    out = capsys.readouterr()
    assert "resumed" in out.out and "from step 2" in out.out and "warning" not in out.err
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") != "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {r["step"]: r["loss"] for r in train} == {
        r["step"]: r["loss"] for r in first if r.get("split") != "eval"}
    side = list((run / "superseded").glob("metrics-*.jsonl"))
    assert len(side) == 1 and '"step": 5' in side[0].read_text()
