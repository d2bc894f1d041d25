"""Tests of :mod:`qdelta_jax.train.loop` on the real tiny QDeltaLM: non-finite steps are skipped,
gradient accumulation equals the full batch, the schedule and the weight-decay mask follow the
recipe."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qdelta_jax.train import data as D
from qdelta_jax.train import loop, trainer
from qdelta_jax.train import sharding as shd

pytestmark = pytest.mark.usefixtures("xla_cache")


def make_session(**kw):
    args = trainer.TrainArgs(**{"batch_size": 4, "seq_len": 32, "steps": 10, "warmup": 2,
                                "lr": 3e-3, **kw})
    cfg = trainer.model_config_for(args, args.mqar_vocab, False)
    return trainer.Session(args, cfg, shd.make_mesh(None))


@pytest.fixture(scope="module")
def session():
    return make_session()


def batch_of(sess, index=0):
    a = sess.args
    return D.MQAR(a.batch_size, a.resolved_seq_len(), a.num_pairs, a.mqar_vocab, a.seed
                  ).batch(index)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_nonfinite_step_is_skipped(session):
    state = session.init_state()
    p0, o0 = host(state.params), host(state.opt_state)
    bad = batch_of(session)
    bad["mask"] = bad["mask"].copy()
    bad["mask"][0, 0] = np.nan  # poisons the loss and every gradient
    state, m = session.train_step(state, shd.shard_batch(bad, session.mesh))
    m = host(m)
    assert not m["finite"] and int(m["bad_steps"]) == 1 and int(m["skipped"]) == 1
    assert int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, host(state.params), p0)
    jax.tree.map(np.testing.assert_array_equal, host(state.opt_state), o0)

    state, m = session.train_step(state, shd.shard_batch(bad, session.mesh))
    assert int(m["bad_steps"]) == 2 and int(m["skipped"]) == 2

    good = batch_of(session, 1)
    state, m = session.train_step(state, shd.shard_batch(good, session.mesh))
    m = host(m)
    assert m["finite"] and int(m["bad_steps"]) == 0 and int(m["skipped"]) == 2
    # The first applied update uses the schedule's first lr: skipped steps don't advance it.
    np.testing.assert_allclose(m["lr"], float(loop.lr_schedule(session.ocfg)(0)), rtol=1e-6)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                           host(state.params), p0))
    assert all(changed)


def test_grad_accumulation_equals_full_batch(session):
    accum = make_session(grad_accum=2)
    batch = batch_of(session, 3)
    s1, m1 = session.train_step(session.init_state(), shd.shard_batch(batch, session.mesh))
    s2, m2 = accum.train_step(accum.init_state(), shd.shard_batch(batch, accum.mesh))
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 host(s2.params), host(s1.params))


def test_schedule():
    cfg = loop.OptimConfig(lr=1e-3, warmup=10, steps=100)
    sched = loop.lr_schedule(cfg)
    lrs = np.array([float(sched(i)) for i in range(100)])
    np.testing.assert_allclose(lrs[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-6)
    assert np.all(np.diff(lrs[10:]) <= 1e-12), "cosine decay after warm-up"
    np.testing.assert_allclose(lrs[-1], 1e-4, rtol=1e-5)  # 0.1x peak at the last step
    assert lrs[0] > 0, "no step is wasted at lr 0"


def test_weight_decay_mask(session):
    mask = loop.decay_mask_for(session.fns.abstract_params)
    flat = {loop.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    for name, decays in flat.items():
        if any(s in name for s in ("A_log", "dt_bias", "norm", "bias")):
            assert not decays, name
    assert flat["blocks/0/attn/q_proj/kernel"] and flat["lm_head/kernel"]
    assert not flat["blocks/0/attn/A_log"] and not flat["blocks/0/attn/dt_bias"]
    # the fallback rule (by path names) agrees with the model's own mask
    fb = loop.default_decay_mask(session.fns.abstract_params)
    assert jax.tree.leaves(fb) == jax.tree.leaves(mask)


def test_optimizer_hyperparameters(session):
    tx = loop.make_optimizer(loop.OptimConfig(lr=1.0, warmup=0, steps=10, weight_decay=0.0))
    # clip by global norm 1.0: a gradient of norm 10 is scaled to norm 1 before Adam
    params = {"w": np.zeros((3,), np.float32)}
    st = tx.init(params)
    upd, _ = tx.update({"w": np.array([6.0, 8.0, 0.0], np.float32)}, st, params)
    # Adam's first step is g / (|g| + eps) elementwise: signs of the clipped gradient
    np.testing.assert_allclose(np.asarray(upd["w"]), [-1.0, -1.0, 0.0], atol=1e-6)


def test_flops_per_token(session):
    p = session.fns.abstract_params
    n = loop.count_params(p)
    f = loop.flops_per_token(p, session.model_cfg, 32)
    emb = int(np.prod(p["embed"]["embedding"].shape))
    assert 6 * (n - emb) < f < 6 * n + 1e7
    assert loop.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert loop.peak_flops("cpu", "float32") is None
