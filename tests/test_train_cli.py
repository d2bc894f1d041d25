"""Tests of ``qdelta-train`` (:mod:`qdelta_jax.train.cli`) and ``qdelta-eval``
(:mod:`qdelta_jax.train.evaluate`): every class of bad option exits 2 with a clear message, config
files, ``python -m``, non-finite blow-ups stop the run, and the default task learns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train import cli, evaluate

pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture
def bad_config(tmp_path):
    p = tmp_path / "opts.json"
    p.write_text(json.dumps({"steps": 5, "learning_rate": 0.1}))
    return p


@pytest.mark.parametrize("argv,flag,msg", [
    (["--mesh", "data=3"], "--mesh", "devices"),
    (["--mesh", "pipeline=1"], "--mesh", "unknown axis"),
    (["--task", "text", "--data", "/no/such/path"], "--data", "no such file"),
    (["--task", "text"], "--data", "required"),
    (["--preset", "huge"], "--preset", "unknown"),
    (["--steps", "-5"], "--steps", ">= 1"),
    (["--batch-size", "0"], "--batch-size", ">= 1"),
    (["--lr", "nan"], "--lr", "positive"),
    (["--dtype", "float16"], "--dtype", "bfloat16"),
    (["--grad-accum", "3"], "--grad-accum", "divide"),
    (["--num-pairs", "40"], "--seq-len", "needs --seq-len"),
    (["--task", "niah", "--seq-len", "40"], "--seq-len", "needs --seq-len"),
    (["--implementation", "cuda"], "--implementation", "one of"),
    (["--implementation", "xla", "--no-save-residuals"], "--no-save-residuals", "pallas"),
    (["--model-overrides", "hidden_sise=3"], "--model-overrides", "hidden_sise"),
    (["--config", "/no/such.toml"], "--config", "no such file"),
])
def test_bad_options_exit_2(argv, flag, msg, capsys, tmp_path):
    rc = cli.main(argv + ["--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert flag in err and msg in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_key(bad_config, capsys):
    assert cli.main(["--config", str(bad_config)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "unknown option 'learning_rate'" in err


def test_argparse_errors_exit_2(capsys):
    for argv in (["--steps", "abc"], ["--no-such-flag"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert "qdelta-train: error:" in capsys.readouterr().err


def test_incompatible_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    args = cli.parse_args([])
    from qdelta_jax.train import trainer

    cfg = trainer.model_config_for(args, args.mqar_vocab, False).to_dict()
    cfg["hidden_size"] = 128
    cfg["fixed_lam"] = 0.5
    ckpt.write_run_config(run, {"model": cfg, "train": {}})
    before = (run / "config.json").read_text()
    assert cli.main(["--run-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--run-dir" in err and "hidden_size: 128 (saved) vs 64 (requested)" in err
    assert "fixed_lam" in err
    assert (run / "config.json").read_text() == before, "never overwritten"


def test_config_files_and_precedence(tmp_path):
    toml = tmp_path / "o.toml"
    toml.write_text('task = "niah"\nbatch-size = 8\nlr = 0.002\nno_decay_gate = true\n'
                    'niah-variant = "uuid"\nfixed-lam = 0.5\n')
    a = cli.parse_args(["--config", str(toml), "--batch-size", "16"])
    assert (a.task, a.batch_size, a.lr, a.no_decay_gate, a.niah_variant, a.fixed_lam) == (
        "niah", 16, 0.002, True, "uuid", 0.5)
    js = tmp_path / "o.json"
    js.write_text(json.dumps({"steps": 7, "mesh": "data=1", "seq_len": None}))
    a = cli.parse_args(["--config", str(js)])
    assert (a.steps, a.mesh, a.seq_len, a.task) == (7, "data=1", None, "mqar")
    assert cli.parse_args([]) == cli.TrainArgs()


def test_ablation_flags_reach_the_model():
    from qdelta_jax.train import trainer

    a = cli.parse_args(["--fixed-lam", "0.5", "--no-decay-gate", "--dtype", "bfloat16",
                        "--implementation", "reference"])
    cfg = trainer.model_config_for(a, 64, False)
    assert (cfg.fixed_lam, cfg.use_decay, cfg.compute_dtype, cfg.implementation) == (
        0.5, False, "bfloat16", "reference")


def test_python_m_help():
    p = subprocess.run([sys.executable, "-m", "qdelta_jax.train", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    for flag in ("--preset", "--task", "--mesh", "--run-dir", "--config", "--no-decay-gate"):
        assert flag in p.stdout


def test_lr_blowup_stops_after_max_bad_steps(tmp_path, capsys):
    run = tmp_path / "nan"
    rc = cli.main(["--steps", "12", "--batch-size", "4", "--seq-len", "32", "--lr", "1e30",
                   "--warmup", "0", "--max-bad-steps", "3", "--eval-every", "0",
                   "--save-every", "0", "--run-dir", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "3 consecutive steps had a non-finite loss" in err and "--max-bad-steps 3" in err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped"] == 3 and len(lines) <= 5


def test_default_task_learns_and_eval(tmp_path, capsys):
    """The default task (tiny preset, MQAR) on a shorter budget: recall well above chance
    (1 / 28 value tokens = 0.036)."""
    run = tmp_path / "learn"
    rc = cli.main(["--steps", "120", "--seq-len", "32", "--eval-every", "0", "--save-every", "0",
                   "--run-dir", str(run), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "recall accuracy" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["accuracy"] > 0.5, summary
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert evals and evals[-1]["split"] == "eval" and "accuracy" in evals[-1]

    rows = evaluate.evaluate_run(run, seq_lens=[32, 64], batches=1, log=lambda *a: None)
    assert [r["seq_len"] for r in rows] == [32, 64]
    assert rows[0]["accuracy"] > 0.5
    assert (run / "eval.json").exists() and (run / "eval_recall.png").exists()
    assert evaluate.main([str(tmp_path / "missing")]) == 2


def test_no_save_residuals_flag_trains_the_same_and_changes_nothing_else(tmp_path, monkeypatch):
    """--no-save-residuals (Pallas kernels, interpret mode here) reaches the kernels' config
    (save_residuals off) through the model config, gives the losses of the default run
    (residuals kept) and leaves the kernels' default as it found it."""
    from qdelta_jax.pallas import config as pcfg
    from qdelta_jax.pallas import core as pcore

    seen = []

    def spy(*a, **kw):
        cfg = pcfg.get_config(*a, **kw)
        seen.append(cfg.save_residuals)
        return cfg

    monkeypatch.setattr(pcore, "get_config", spy)

    def train(name, extra):
        # One layer, batch 2: the kernels run in interpret mode here, where every layer and row
        # costs, and one of each carries the switch as far as more would.
        argv = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--warmup", "1",
                "--implementation", "pallas", "--eval-every", "0", "--eval-batches", "1",
                "--save-every", "0", "--no-progress", "--model-overrides", "num_hidden_layers=1",
                "--run-dir", str(tmp_path / name), *extra]
        assert cli.main(argv) == 0
        text = (tmp_path / name / "metrics.jsonl").read_text()
        return [json.loads(x) for x in text.splitlines() if x]

    base = train("base", [])
    assert seen and all(seen)
    seen.clear()
    recomputed = train("recomputed", ["--no-save-residuals"])
    assert seen and not any(seen)
    assert pcfg.get_config(16, 32, 16, "float32").save_residuals
    for a, b in zip(base, recomputed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
