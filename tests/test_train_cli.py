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


# ----------------------------------------------------------------------------------------------
# One declaration of the options; one loading API for qdelta-eval and qdelta-generate


def test_every_option_is_declared_once(tmp_path, monkeypatch):
    """The parser, ``--config`` files and the run summary all read the fields of
    :class:`~qdelta_jax.train.options.TrainArgs`: every field's flag sets it (values through the
    field's converter, switches and ``--no-...`` flags to the non-default), a config file takes
    every option, ``--help`` shows every field's help, and the options a rerun does not reuse or
    warns about follow the fields' marks."""
    from qdelta_jax.train import options as O

    want = O.TrainArgs(
        preset="340m", task="niah", steps=7, batch_size=8, seq_len=48, lr=1e-3, warmup=3,
        weight_decay=0.0, save_every=5, eval_every=6, eval_batches=2,
        run_dir=str(tmp_path / "none"), mesh="data=1", seed=3, num_pairs=2, mqar_vocab=32,
        niah_variant="uuid", eos_id=5, tokenizer="t.json", grad_accum=2, dtype="bfloat16",
        param_dtype="bfloat16", train_accuracy=True, implementation="xla", fixed_lam=0.5,
        no_decay_gate=True, remat=True, save_residuals=False, model_overrides="num_heads=2",
        max_bad_steps=3, stop_after=4, resume_from=2, peak_tflops=100.0, progress=False,
        diagnostics=True, init_from="p")
    argv = []
    for name, field in O.FIELDS.items():
        value = getattr(want, name)
        if field.metadata["kind"] == O.VALUE:
            argv += [O.flag_of(name), str(value)]
        elif value != field.default:
            argv.append(O.flag_of(name))
    assert cli.parse_args(argv) == want
    f = tmp_path / "all.json"
    f.write_text(json.dumps(want.to_dict()))
    assert cli.parse_args(["--config", str(f)]) == want

    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: no wrapping inside a help
    text = " ".join(cli.build_parser().format_help().split())
    for name, field in O.FIELDS.items():
        help_ = field.metadata["off_help" if field.metadata["kind"] == O.NEGATED else "help"]
        assert O.flag_of(name) in text and " ".join(help_.split()) in text, name
    assert set(O.PER_INVOCATION) == {"run_dir", "stop_after", "resume_from", "progress"}
    assert set(O.RESUME_SENSITIVE) == {
        "task", "data", "seed", "batch_size", "seq_len", "num_pairs", "mqar_vocab",
        "niah_variant", "eos_id", "tokenizer", "grad_accum", "lr", "warmup", "steps",
        "weight_decay"}


def test_eval_and_generate_load_through_load_run(tmp_path):
    """``params.load_run`` gives a run's step, the options it was trained with (those of
    ``config.json`` and ``summary.json``) and its parameters laid out over a mesh; the
    evaluator of ``qdelta-eval`` on them reproduces the trainer's final evaluation, and
    ``load_model`` is the same load."""
    import jax
    import numpy as np

    from qdelta_jax.train import load_model, params
    from qdelta_jax.train import sharding as shd
    from qdelta_jax.train.options import make_sources

    run = tmp_path / "run"
    assert cli.main(["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--warmup", "1",
                     "--eval-every", "0", "--save-every", "0", "--eval-batches", "2",
                     "--no-progress", "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["options"] == config["train"]
    assert summary["options"]["run_dir"] == str(run) and summary["options"]["steps"] == 2

    mesh = shd.make_mesh(None)
    saved = params.load_run(run, mesh=mesh)
    assert saved.step == 2 and saved.tokenizer is None
    assert saved.options.to_dict() == config["train"]
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(saved.params))

    args, opened, evaluator = evaluate.open_run(run)
    _, source = make_sources(args)
    ev = evaluator(opened.params, source, args.eval_batches)
    assert ev == pytest.approx(summary["eval"], rel=1e-6)

    from flax import nnx

    got = nnx.to_pure_dict(nnx.state(load_model(run), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, jax.device_get(saved.params))


def test_eval_refuses_a_params_directory(tmp_path, capsys):
    """A ``qdelta-convert`` params directory loads (no training options), but ``qdelta-eval``
    refuses it: nothing names a task to evaluate on."""
    from flax import nnx

    from qdelta_jax.model import QDeltaConfig, QDeltaLM
    from qdelta_jax.train import params

    cfg = QDeltaConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=1)
    params.save_params(tmp_path / "p", QDeltaLM(cfg, rngs=nnx.Rngs(0)))
    saved = params.load_run(tmp_path / "p")
    assert saved.step == 0 and saved.options is None and saved.config == cfg
    assert evaluate.main([str(tmp_path / "p")]) == 2
    assert "params directory, not a qdelta-train run" in capsys.readouterr().err


def test_eval_and_generate_do_not_import_the_trainer():
    """``qdelta-eval``, ``qdelta-generate`` and the loading API stand apart from the trainer."""
    import ast
    import inspect

    from qdelta_jax.train import generate, params

    for mod in (evaluate, generate, params):
        names = set()
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.ImportFrom):
                names.add(node.module or "")
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        assert not [n for n in names if n.endswith(".trainer") or ".trainer." in n], mod
