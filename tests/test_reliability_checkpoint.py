"""Nothing lost: checkpoint checksums (a flipped byte is caught on restore, set aside by training,
skipped by evaluation), good-checkpoint marking after a divergence, keep-last-N keeping the last
good step, ``--resume-from``."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train import cli, evaluate, trainer

BASE = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--save-every", "1",
        "--eval-every", "0", "--eval-batches", "1", "--warmup", "2", "--no-progress"]

pytestmark = pytest.mark.usefixtures("xla_cache")


def small_state(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    return {"w": jax.random.normal(k[0], (16, 64)), "b": jax.random.normal(k[1], (64,)).astype(
        jnp.bfloat16), "step": jnp.int32(seed), "rng": jax.random.PRNGKey(seed)}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def raw_restore(step_dir: Path, like):
    """What Orbax alone reads back (no checksums): None if it raises."""
    try:
        with ocp.StandardCheckpointer() as c:
            return c.restore(step_dir / "state", abstract(like))
    except Exception:  # noqa: BLE001 -- any failure: this flip is not a silent one
        return None


def flip_silently(step_dir: Path, like) -> list[str]:
    """Flips one bit of the step's largest array file at the first offset where Orbax still
    reads the arrays back without an error but with other values: the silent corruption a bad
    disk or a copy gives. Returns the paths of the arrays it changed."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    big = max(files, key=lambda p: p.stat().st_size)
    data = big.read_bytes()
    for pos in range(len(data) // 2, len(data), 37):
        flipped = bytearray(data)
        flipped[pos] ^= 0x04
        big.write_bytes(bytes(flipped))
        got = raw_restore(step_dir, like)
        if got is None:
            continue
        changed = [jax.tree_util.keystr(p) for (p, x), y in zip(
            jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(like), strict=True)
            if not np.array_equal(np.asarray(x), np.asarray(y))]
        if changed:
            return changed
    raise AssertionError("no silent flip found")


def test_checksums_change_with_any_element_and_ignore_sharding():
    s = small_state()
    base = ckpt.checksums(s)
    assert base == ckpt.checksums(jax.tree.map(jnp.copy, s))
    w = np.asarray(s["w"]).copy()
    w.view(np.uint32)[3, 5] ^= 1  # one bit of one element
    assert ckpt.checksums({**s, "w": jnp.asarray(w)})["w"] != base["w"]
    swapped = np.asarray(s["w"])[::-1]  # same values, other places
    assert ckpt.checksums({**s, "w": jnp.asarray(swapped)})["w"] != base["w"]


def save_two(tmp_path):
    """Checkpoints of steps 1 (``small_state(0)``) and 2 (returned, the restore target's
    shape) in ``tmp_path``."""
    like = small_state(1)
    c = ckpt.Checkpointer(tmp_path, async_save=False)
    c.save(1, small_state(0), {"index": 1})
    c.save(2, like, {"index": 2})
    c.close()
    return like


def test_flipped_byte_is_caught_set_aside_and_previous_used(tmp_path):
    like = save_two(tmp_path)
    flip_silently(tmp_path / "checkpoints" / "2", like)
    c = ckpt.Checkpointer(tmp_path, async_save=False)
    with pytest.warns(ckpt.CheckpointFallbackWarning, match="do not match the checksums"):
        step, state, data = c.restore_latest(abstract(like))
    assert (step, data) == (1, {"index": 1})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(small_state(0)["w"]))
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt").iterdir()] == ["2"]


def test_read_only_restore_skips_without_moving(tmp_path):
    like = save_two(tmp_path)
    flip_silently(tmp_path / "checkpoints" / "2", like)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    c = ckpt.Checkpointer(tmp_path, read_only=True)
    with pytest.warns(ckpt.CheckpointFallbackWarning, match="left in place"):
        assert c.restore_latest(abstract(like))[0] == 1
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "evaluation changes nothing"


def test_missing_metadata_falls_back_instead_of_different_state(tmp_path):
    like = save_two(tmp_path)
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    c = ckpt.Checkpointer(tmp_path, async_save=False)
    with pytest.warns(ckpt.CheckpointFallbackWarning, match="step 2"):
        assert c.restore_latest(abstract(like))[0] == 1


def test_keep_last_n_never_deletes_the_last_good(tmp_path):
    c = ckpt.Checkpointer(tmp_path, keep=2, async_save=False)
    for s in range(1, 7):
        c.save(s, small_state(s), {"index": s})
        c.mark(s, s == 2, "" if s == 2 else f"step {s + 1}: loss above 8")
    c.wait()
    c.prune()
    assert c.steps() == [2, 5, 6]
    assert c.last_good() == 2
    health = json.loads((tmp_path / ckpt.HEALTH_FILE).read_text())["steps"]
    assert health["2"]["good"] is True and health["6"]["good"] is False


def test_judge_marks_by_the_next_step():
    class Spy:
        health: dict = {}

        def __init__(self):
            self.marks = {}

        def mark(self, step, good, why="", window_ok=True):
            self.marks[step] = good

    spy = Spy()
    j = trainer._Judge(spy, limit=8.0, step0=0)
    rec = lambda s, loss: {"step": s, "loss": loss, "grad_norm": 1.0}
    j.step_done(rec(1, 4.0))
    j.saved(2)  # saved before step 2's metrics arrive
    j.step_done(rec(2, 4.0))
    assert spy.marks[2] is None, "judged only once step 3 is seen"
    j.step_done(rec(3, 3.0))
    assert spy.marks[2] is True
    j.saved(4)
    j.step_done(rec(4, 3.0))
    j.step_done(rec(5, 1e8))  # the params of checkpoint 4 blew up
    assert spy.marks[4] is False
    j.saved(6)
    j.step_done(rec(6, float("nan")))
    assert spy.marks[6] is False, "a non-finite step in its window: bad at once"
    j.step_done(rec(7, float("nan")))
    j.saved(8)
    assert spy.marks[8] is False, "step 7 is in the window of checkpoint 8"
    j.step_done(rec(8, 3.0))
    j.step_done(rec(9, 3.0))
    j.saved(10)
    j.step_done(rec(10, 3.0))
    j.step_done(rec(11, 3.0))
    assert spy.marks[10] is True, "healthy again"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel") / "run"
    assert cli.main(BASE + ["--run-dir", str(d)]) == 0
    return d


def test_training_sets_aside_a_flipped_checkpoint(run_dir, tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    sess_state = ckpt.Checkpointer(d, read_only=True)
    like = sess_state.manager.restore(4, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    sess_state.close()
    changed = flip_silently(d / "checkpoints" / "4", like)
    # Evaluation restores the parameters only, read-only, and moves nothing: a damaged parameter
    # makes it fall back with a warning; damage elsewhere (an optimizer moment) leaves the
    # parameters of step 4 good to use.
    eval_argv = [str(d), "--seq-lens", "32", "--batches", "1", "--no-plot"]
    if any("params" in c for c in changed):
        with pytest.warns(ckpt.CheckpointFallbackWarning, match="step 4"):
            assert evaluate.main(eval_argv) == 0
        assert "step 3" in capsys.readouterr().out
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ckpt.CheckpointFallbackWarning)
            assert evaluate.main(eval_argv) == 0
        assert "step 4" in capsys.readouterr().out
    assert not (d / "corrupt").exists()
    # training: sets it aside and resumes from step 3
    with pytest.warns(ckpt.CheckpointFallbackWarning, match="do not match the checksums"):
        assert cli.main(["--run-dir", str(d), "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out and (d / "corrupt").is_dir()
    losses = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    a = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pick = lambda rs: {r["step"]: r["loss"] for r in rs if r.get("split") != "eval"}
    assert pick(losses) == pick(a)


def test_divergence_keeps_the_last_good_and_names_it(run_dir, tmp_path, capsys):
    d = tmp_path / "div"
    assert cli.main(BASE + ["--steps", "12", "--run-dir", str(d), "--stop-after", "3"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(["--run-dir", str(d), "--lr", "1e9", "--max-bad-steps", "2",
                       "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "--lr" in err and "overriding" in err, "the override is reported"
    assert "last good checkpoint is step 3" in err and "--resume-from 3" in err
    steps = sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 in steps and len(steps) == 4, "the newest 3 and the last good one"
    # a plain rerun refuses to continue from the diverged state
    assert cli.main(["--run-dir", str(d), "--no-progress"]) == 2
    assert "--resume-from 3" in capsys.readouterr().err
    # resuming from the good step with a sane lr works; the newer steps move aside
    assert cli.main(["--run-dir", str(d), "--resume-from", "3", "--lr", "3e-3",
                     "--stop-after", "1", "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
    moved = [p for p in (d / "superseded").iterdir() if p.is_dir()]
    assert moved and all(int(p.name) > 3 for p in moved[0].iterdir())
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in recs if r.get("split") != "eval"]
    assert train == [1, 2, 3, 4], "each step once"
