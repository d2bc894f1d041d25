"""Messages, not tracebacks: file-system faults (disk full, read-only run directory, a damaged
``config.json``), constructor and cache checks of the layer and the model, named pipes in a data
folder (skipped with a warning instead of hanging)."""

from __future__ import annotations

import errno
import os
import threading

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from qdelta_jax.layers import QDelta
from qdelta_jax.model import QDeltaConfig, QDeltaLM
from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train import cli, trainer
from qdelta_jax.train import data as D

BASE = ["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--save-every", "1",
        "--eval-every", "0", "--eval-batches", "1", "--no-progress"]

# The error TensorStore gives Orbax on a full disk (as measured on a full tmpfs).
TS_FULL = ('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.mu/0" in OCDBT database at local '
           'file "/runs/r/checkpoints/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.'
           'process_0/": Failed writing: "/runs/r/checkpoints/2.orbax-checkpoint-tmp/state/d/e6": '
           "Failed to write 1113802 bytes to file 16: No space left on device "
           "[os_error_code='28']")


def test_describe_io_error_finds_the_cause():
    inner = ValueError(TS_FULL)
    try:
        try:
            raise inner
        except ValueError as e:
            raise RuntimeError("Save Finalize thread failed") from e
    except RuntimeError as outer:
        msg = trainer.describe_io_error(outer, "saving checkpoint step 2", "rerun to resume")
    assert msg == ("saving checkpoint step 2 failed (/runs/r/checkpoints/2): No space left on "
                   "device. The disk is full: free space there (or use a --run-dir on another "
                   "disk); then rerun to resume")
    ro = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")
    assert "use a --run-dir on a writable disk" in trainer.describe_io_error(ro, "x")
    assert trainer.describe_io_error(ValueError("shapes differ"), "x") is None


def test_disk_full_during_a_save_is_one_line(tmp_path, monkeypatch, capsys, xla_cache):
    real = ocp.CheckpointManager.save

    def full(self, step, *a, **kw):
        if step == 2:
            raise ValueError(TS_FULL)
        return real(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    run = tmp_path / "r"
    assert cli.main(BASE + ["--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("qdelta-train: error: saving checkpoint step 2")
    assert "No space left on device" in last and f"--run-dir {run}" in last
    assert (run / "checkpoints" / "1").is_dir(), "the checkpoint already saved is kept"


def test_read_only_run_dir_is_one_line(tmp_path, monkeypatch, capsys):
    def refuse(run_dir, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(run_dir / "config.json.tmp"))

    monkeypatch.setattr(ckpt, "write_run_config", refuse)
    assert cli.main(BASE + ["--run-dir", str(tmp_path / "ro")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "writing" in err and "Read-only file system" in err and "writable disk" in err


@pytest.mark.parametrize("text", ["", '{"model": {"hidden_size": 6', "[1, 2]"])
def test_damaged_run_config_is_one_line(tmp_path, capsys, text):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(text)
    assert cli.main(BASE + ["--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdelta-train: error:") and str(run / "config.json") in err
    assert "new --run-dir" in err and (run / "config.json").read_text() == text


@pytest.mark.parametrize("text", ["", "{not json"])
def test_model_config_json_names_the_file(tmp_path, text):
    p = tmp_path / "cfg.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=str(p)):
        QDeltaConfig.from_json(p)


@pytest.mark.parametrize("kw, name", [
    (dict(num_heads=0), "num_heads"), (dict(head_dim=0), "head_dim"),
    (dict(hidden_size=-4), "hidden_size"), (dict(chunk_size=48), "chunk_size"),
    (dict(num_v_heads=0), "num_v_heads"), (dict(conv_size=0), "conv_size"),
])
def test_layer_constructor_checks(kw, name):
    args = dict(hidden_size=32, num_heads=2, head_dim=16) | kw
    with pytest.raises(ValueError, match=rf"QDelta: {name} must be"):
        QDelta(**args, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    return QDeltaLM(QDeltaConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=1),
                    rngs=nnx.Rngs(0))


@pytest.mark.parametrize("n", [-1, 0, 2.5])
def test_init_cache_refuses_bad_batch_sizes(model, n):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.init_cache(n)


def test_step_refuses_a_cache_of_another_batch(model):
    with pytest.raises(ValueError, match="cache holds 3 sequences but tokens has batch size 2"):
        model.step(jnp.zeros((2, 1), jnp.int32), model.init_cache(3))


def test_named_pipe_in_data_folder_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 100)
    fifo = tmp_path / "b.pipe"
    os.mkfifo(fifo)
    result = {}

    def load():
        with pytest.warns(D.DataWarning, match="not regular files") as rec:
            result["tokens"] = D.load_tokens(tmp_path)
        result["warned"] = [str(w.message) for w in rec]

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader so the thread can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("load_tokens hung on a named pipe")
    tokens, eos, vocab = result["tokens"]
    assert len(tokens) == 1001 and str(fifo) in result["warned"][0]


def test_named_pipe_as_data_is_an_error(tmp_path):
    fifo = tmp_path / "p.txt"
    os.mkfifo(fifo)
    with pytest.raises(D.DataError, match="not a regular file"):
        D.load_tokens(fifo)
