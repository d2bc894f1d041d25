"""The bad-input catalogue of ``docs/BAD_INPUTS.md``, checked: every class of bad input that fails
fast gives its one-line message (and no traceback). ``python tests/test_reliability_catalogue.py``
prints the markdown table of the catalogue from real calls."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

CLI = ["--steps", "1", "--batch-size", "4", "--seq-len", "32", "--no-progress"]


def _cli(argv, prog="train"):
    from qdelta_jax.train import cli, evaluate

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = (cli.main if prog == "train" else evaluate.main)(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    lines = [x for x in err.getvalue().splitlines() if x.strip() and not x.startswith("usage")]
    assert rc != 0, argv
    assert "Traceback" not in err.getvalue()
    start = max(i for i, x in enumerate(lines) if x.startswith("qdelta-"))
    return "\n".join(lines[start:])


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the message is what we catalogue
        return f"{type(e).__name__}: {e}"
    raise AssertionError("no error")


def _warns(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert msgs
    return f"{rec[0].category.__name__}: {msgs[0]}"


def _file(d: Path, name: str, ids, dtype=np.int32):
    p = d / name
    a = np.asarray(ids, dtype)
    np.save(p, a) if name.endswith(".npy") else a.tofile(p)
    return str(p)


def _text(d: Path, name="a.txt", text="hello world " * 20):
    p = d / name
    p.write_text(text)
    return str(p)


def _run_dir(d: Path, config_text: str | None = None, model_change: dict | None = None):
    from qdelta_jax.train import checkpoint as ckpt
    from qdelta_jax.train import trainer

    run = d / "run"
    run.mkdir(exist_ok=True)
    if config_text is not None:
        (run / "config.json").write_text(config_text)
        return str(run)
    a = trainer.TrainArgs(batch_size=4, seq_len=32).resolved()
    cfg = trainer.model_config_for(a, a.mqar_vocab, False).to_dict()
    cfg.update(model_change or {})
    ckpt.write_run_config(run, {"model": cfg, "train": dataclasses.asdict(a)})
    return str(run)


def _model():
    from flax import nnx

    from qdelta_jax.model import QDeltaConfig, QDeltaLM

    return QDeltaLM(QDeltaConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=1),
                    rngs=nnx.Rngs(0))


def _op(**kw):
    from qdelta_jax import qdelta_rule

    q = jnp.ones((1, 8, 2, 4))
    g = jnp.zeros((1, 8, 2))
    args = dict(q=q, k=q, v=jnp.ones((1, 8, 2, 3)), g=g, beta=g + 0.5, lam=g)
    args.update({k: v for k, v in kw.items() if k in args})
    rest = {k: v for k, v in kw.items() if k not in args}
    return qdelta_rule(*args.values(), implementation="xla", **rest)


def _layer(**kw):
    from flax import nnx

    from qdelta_jax.layers import QDelta

    return QDelta(**(dict(hidden_size=32, num_heads=2, head_dim=16) | kw), rngs=nnx.Rngs(0))


def _fifo(d: Path, inside: bool):
    from qdelta_jax.train import data as D

    if inside:
        _text(d)
        os.mkfifo(d / "pipe")
        return D.load_tokens(d)
    os.mkfifo(d / "pipe.txt")
    return D.load_tokens(d / "pipe.txt")


# (area, what the user did, function of a scratch folder returning the message, a phrase of it)
CASES = [
    ("qdelta-train", "`--steps 0`", lambda d: _cli(["--steps", "0"]), "--steps must be >= 1"),
    ("qdelta-train", "`--steps 2.5`", lambda d: _cli(["--steps", "2.5"]), "expected an integer"),
    ("qdelta-train", "`steps: 2.5` in `--config`", lambda d: _cli(
        ["--config", _text(d, "c.json", '{"steps": 2.5}')]), "bad value for 'steps'"),
    ("qdelta-train", "`\"lr\": true` in `--config`", lambda d: _cli(
        ["--config", _text(d, "c.json", '{"lr": true}')]), "expected a number"),
    ("qdelta-train", "unknown key in `--config`", lambda d: _cli(
        ["--config", _text(d, "c.json", '{"learning_rate": 1}')]), "unknown option"),
    ("qdelta-train", "empty `--config` file", lambda d: _cli(
        ["--config", _text(d, "c.json", "")]), "cannot parse"),
    ("qdelta-train", "`--config` that does not exist", lambda d: _cli(
        ["--config", str(d / "no.toml")]), "no such file"),
    ("qdelta-train", "`--batch-size 0`", lambda d: _cli(["--batch-size", "0"]), "--batch-size"),
    ("qdelta-train", "`--seq-len 1`", lambda d: _cli(["--seq-len", "1"]), "--seq-len"),
    ("qdelta-train", "`--lr nan`", lambda d: _cli(["--lr", "nan"]), "positive number"),
    ("qdelta-train", "`--warmup -1`", lambda d: _cli(["--warmup", "-1"]), "--warmup"),
    ("qdelta-train", "`--grad-accum 3` with `--batch-size 4`", lambda d: _cli(
        ["--grad-accum", "3", "--batch-size", "4"]), "must divide"),
    ("qdelta-train", "`--dtype float16`", lambda d: _cli(["--dtype", "float16"]), "--dtype"),
    ("qdelta-train", "`--implementation cuda`", lambda d: _cli(["--implementation", "cuda"]),
     "--implementation"),
    ("qdelta-train", "`--no-save-residuals --implementation xla`", lambda d: _cli(
        ["--no-save-residuals", "--implementation", "xla"]), "pallas implementation only"),
    ("qdelta-train", "`--preset huge`", lambda d: _cli(["--preset", "huge"]), "unknown"),
    ("qdelta-train", "`--task foo`", lambda d: _cli(["--task", "foo"]), "unknown"),
    ("qdelta-train", "`--mesh data=3` on one device", lambda d: _cli(["--mesh", "data=3"]),
     "devices"),
    ("qdelta-train", "`--mesh gpu=2`", lambda d: _cli(["--mesh", "gpu=2"]), "unknown axis"),
    ("qdelta-train", "`--num-pairs 20 --seq-len 32` (MQAR)", lambda d: _cli(
        CLI + ["--num-pairs", "20"]), "--seq-len"),
    ("qdelta-train", "`--task niah --seq-len 32`", lambda d: _cli(
        CLI + ["--task", "niah"]), "niah"),
    ("qdelta-train", "`--model-overrides hidden_size`", lambda d: _cli(
        CLI + ["--model-overrides", "hidden_size"]), "KEY=VALUE"),
    ("qdelta-train", "`--model-overrides num_heads=0`", lambda d: _cli(
        CLI + ["--model-overrides", "num_heads=0"]), "num_heads"),
    ("qdelta-train", "`--resume-from 5` without `--run-dir`", lambda d: _cli(
        ["--resume-from", "5"]), "needs --run-dir"),
    ("qdelta-train", "`--resume-from 5`, no such checkpoint", lambda d: _cli(
        CLI + ["--run-dir", _run_dir(d), "--resume-from", "5"]), "no such checkpoint"),
    ("run directory", "`--run-dir` is a file", lambda d: _cli(
        CLI + ["--run-dir", _text(d)]), "not a directory"),
    ("run directory", "empty `config.json` in the run directory", lambda d: _cli(
        CLI + ["--run-dir", _run_dir(d, "")]), "is empty"),
    ("run directory", "truncated `config.json`", lambda d: _cli(
        CLI + ["--run-dir", _run_dir(d, '{"model": {"hidden')]), "not valid JSON"),
    ("run directory", "run directory of another model", lambda d: _cli(
        CLI + ["--run-dir", _run_dir(d, model_change={"hidden_size": 128})]),
     "different model config"),
    ("data", "`--task text` without `--data`", lambda d: _cli(["--task", "text"]), "required"),
    ("data", "`--data` without `--task text`", lambda d: _cli(["--data", _text(d)]),
     "only read by --task text"),
    ("data", "`--data` that does not exist", lambda d: _cli(
        ["--task", "text", "--data", str(d / "none")]), "no such file"),
    ("data", "`--eos-id` with `--task mqar`", lambda d: _cli(["--eos-id", "3"]),
     "--task text only"),
    ("data", "`--eos-id` with a text file", lambda d: _cli(
        CLI + ["--task", "text", "--data", _text(d), "--eos-id", "3"]), "applies to .bin/.npy"),
    ("data", "`--eos-id` that never occurs in the token file", lambda d: _cli(
        CLI + ["--task", "text", "--data", _file(d, "t.bin", np.arange(5000) % 50, np.uint16),
               "--eos-id", "60000"]), "never occurs"),
    ("data", "negative token id in a `.npy`", lambda d: _cli(
        CLI + ["--task", "text", "--data", _file(d, "t.npy", [3, -1] * 2000)]), "must be >= 0"),
    ("data", "token id 3e9 in a `.u32.bin`", lambda d: _cli(
        CLI + ["--task", "text", "--data",
               _file(d, "t.u32.bin", [3, 3_000_000_000] * 2000, np.uint32)]), "dtype right"),
    ("data", "`.bin` of an odd number of bytes", lambda d: _cli(
        CLI + ["--task", "text", "--data", _file(d, "t.bin", [1, 2, 3], np.uint8)]),
     "multiple of uint16"),
    ("data", "2-D `.npy`", lambda d: _cli(
        CLI + ["--task", "text", "--data", _file(d, "t.npy", np.zeros((4, 4)))]), "1-D integer"),
    ("data", "folder without UTF-8 text", lambda d: _cli(
        CLI + ["--task", "text", "--data", str(Path(_file(d, "x.npy", [1, 2])).parent)]),
     "no UTF-8 text"),
    ("data", "too little text for one batch", lambda d: _cli(
        CLI + ["--task", "text", "--data", _text(d, text="tiny")]), "too few"),
    ("data", "`--data` is a named pipe", lambda d: _raises(lambda: _fifo(d, False)),
     "not a regular file"),
    ("data", "a named pipe inside the `--data` folder (warning; skipped)",
     lambda d: _warns(lambda: _fifo(d, True)), "not regular files"),
    ("qdelta-eval", "`--seq-lens 0`", lambda d: _cli([str(d), "--seq-lens", "0"], "eval"),
     "--seq-lens"),
    ("qdelta-eval", "`--depths 1.5`", lambda d: _cli([str(d), "--depths", "1.5"], "eval"),
     "--depths"),
    ("qdelta-eval", "RUN_DIR that does not exist", lambda d: _cli([str(d / "no")], "eval"),
     "no such directory"),
    ("qdelta-eval", "RUN_DIR without `config.json`", lambda d: _cli([str(d)], "eval"),
     "not a qdelta-train run"),
    ("model", "token id >= vocab_size", lambda d: _raises(
        lambda: _model()(jnp.full((1, 4), 64, jnp.int32))), "must hold ids"),
    ("model", "token id -1", lambda d: _raises(
        lambda: _model()(jnp.full((1, 4), -1, jnp.int32))), "must hold ids"),
    ("model", "float tokens", lambda d: _raises(lambda: _model()(jnp.zeros((1, 4)))),
     "integer array"),
    ("model", "`generate` with a prompt id >= vocab_size", lambda d: _raises(
        lambda: __import__("qdelta_jax.model").model.generate(
            _model(), jnp.array([[1, 99]]), 2)), "prompt must hold ids"),
    ("model", "`init_cache(-1)`", lambda d: _raises(lambda: _model().init_cache(-1)),
     "positive integer"),
    ("model", "`step` with the cache of another batch size", lambda d: _raises(
        lambda: (lambda m: m.step(jnp.zeros((2, 1), jnp.int32), m.init_cache(3)))(_model())),
     "cache holds 3"),
    ("model", "`QDeltaConfig(num_heads=0)`", lambda d: _raises(
        lambda: __import__("qdelta_jax.model").model.QDeltaConfig(num_heads=0)), "num_heads"),
    ("model", "empty model config JSON", lambda d: _raises(
        lambda: __import__("qdelta_jax.model").model.QDeltaConfig.from_json(
            _text(d, "m.json", ""))), "is empty"),
    ("layer", "`QDelta(num_heads=0)`", lambda d: _raises(lambda: _layer(num_heads=0)),
     "num_heads must be"),
    ("layer", "`QDelta(chunk_size=48)`", lambda d: _raises(lambda: _layer(chunk_size=48)),
     "power of two"),
    ("op", "`qdelta_rule` with v of another length", lambda d: _raises(
        lambda: _op(v=jnp.ones((1, 7, 2, 3)))), "shape"),
    ("op", "`qdelta_rule(chunk_size=48)`", lambda d: _raises(lambda: _op(chunk_size=48)),
     "chunk"),
    ("op", "`cu_seqlens` not ending at T", lambda d: _raises(
        lambda: _op(cu_seqlens=jnp.array([0, 3, 7]))), "must end at"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{a}: {w}" for a, w, _, _ in CASES])
def test_catalogue(case, tmp_path):
    _, _, fn, phrase = case
    msg = fn(tmp_path)
    assert phrase in msg, msg
    # One line, except the list of differing keys of another model's run directory.
    assert "\n" not in msg.strip() or "keys that differ" in msg, msg


def markdown() -> str:
    rows = []
    for area, what, fn, _ in CASES:
        with tempfile.TemporaryDirectory() as t:
            msg = fn(Path(t)).replace(t, "/tmp/x")
        msg = " ".join(msg.split()).replace("|", "\\|")
        rows.append(f"| {area} | {what} | `{msg}` |" if "`" not in msg else
                    f"| {area} | {what} | {msg} |")
    return "\n".join(["| where | input | message |", "| --- | --- | --- |", *rows])


if __name__ == "__main__":
    print(markdown())
    sys.exit(0)
