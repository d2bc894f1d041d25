"""Tests of :mod:`qdelta_jax.train.loop` on the real tiny QDeltaLM: non-finite steps are skipped,
gradient accumulation equals the full batch, the schedule and the weight-decay mask follow the
recipe; the chunked LM head + cross-entropy equals the plain loss; bfloat16 params with a float32
master copy train like float32 params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdelta_jax.model import QDeltaConfig, QDeltaLM, chunked_cross_entropy, weight_decay_mask
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
    for warmup in (0, 1):  # no warm-up: the peak at step 0
        sched = loop.lr_schedule(loop.OptimConfig(lr=1e-3, warmup=warmup, steps=50))
        np.testing.assert_allclose([float(sched(0)), float(sched(49))], [1e-3, 1e-4], rtol=1e-5)


def test_weight_decay_mask(session):
    # The optimizer's default is the model's one rule; it also takes a Llama-style model's
    # parameters (benchmarks/llama.py): vectors never decay.
    mask = weight_decay_mask(session.fns.abstract_params)
    flat = {loop.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    for name, decays in flat.items():
        if any(s in name for s in ("A_log", "dt_bias", "norm", "bias")):
            assert not decays, name
    assert flat["blocks/0/attn/q_proj/kernel"] and flat["lm_head/kernel"]
    assert flat["blocks/0/attn/q_conv1d/kernel"] and flat["embed/embedding"]
    assert not flat["blocks/0/attn/A_log"] and not flat["blocks/0/attn/dt_bias"]
    assert weight_decay_mask({"w": np.zeros((3, 3)), "v": np.zeros(3)}) == {"w": True, "v": False}


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


# ----------------------------------------------------------------------------------------------
# The chunked LM head + cross-entropy, and bfloat16 params with a float32 master copy


def _plain_nll(h, w, targets, mask, dtype):
    logits = jnp.dot(h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
    return jnp.sum((lse - picked) * mask), correct


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_cross_entropy_matches_plain_loss(dtype):
    """Loss, correct count and gradients (h, w, mask) equal the plain [N, vocab] computation;
    N = 74 is not a multiple of the chunk (16), D and vocab are not powers of two."""
    dtype = jnp.dtype(dtype)
    k = jax.random.split(jax.random.key(1), 4)
    B, T, D, V = 2, 37, 24, 50
    h = jax.random.normal(k[0], (B, T, D)).astype(dtype)
    w = jax.random.normal(k[1], (D, V)) * 0.3  # float32 storage, cast to dtype for the matmul
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)

    def chunked(h, w, mask):
        return chunked_cross_entropy(h, w, targets, mask, compute_dtype=dtype, chunk_tokens=16,
                                     return_correct=True)

    (nll, correct), grads = jax.value_and_grad(chunked, (0, 1, 2), has_aux=True)(h, w, mask)
    (nll0, correct0), grads0 = jax.value_and_grad(
        lambda h, w, m: _plain_nll(h, w, targets, m, dtype), (0, 1, 2), has_aux=True)(h, w, mask)
    assert float(correct) == float(correct0)
    # float32: summation order only. bfloat16: the gradients are rounded to bfloat16 at
    # different points (eps 2^-8), the loss is float32 in both.
    rtol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(float(nll), float(nll0), rtol=1e-5)
    for g, g0 in zip(grads, grads0, strict=True):
        assert g.dtype == g0.dtype
        g, g0 = np.asarray(g, np.float32), np.asarray(g0, np.float32)
        np.testing.assert_allclose(g, g0, rtol=rtol, atol=rtol * np.abs(g0).max())
    # Under jit and without the count, the same loss.
    np.testing.assert_allclose(
        float(jax.jit(lambda h, w: chunked_cross_entropy(h, w, targets, mask,
                                                         compute_dtype=dtype))(h, w)),
        float(nll0), rtol=1e-5)


def test_chunked_cross_entropy_bad_input():
    h, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    t, m = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="w \\[D, vocab\\]"):
        chunked_cross_entropy(h, jnp.ones((5, 4)), t, m)
    with pytest.raises(ValueError, match="leading shape"):
        chunked_cross_entropy(h, w, t[:, :2], m)
    with pytest.raises(TypeError, match="targets must be integer"):
        chunked_cross_entropy(h, w, t.astype(jnp.float32), m)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(h, w, t, m, chunk_tokens=0)


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_equals_loss_of_logits(tied):
    """QDeltaLM.loss (chunked, 3 chunks of 32 over 2 x 40 tokens) equals the masked nll of the
    model's logits, and so do the gradients of every parameter (float32)."""
    cfg = QDeltaConfig.from_preset("tiny", tie_word_embeddings=tied, implementation="xla")
    model = QDeltaLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 40)) > 0.2, jnp.float32)

    def chunked(m):
        return m.loss(tokens, targets, mask, chunk_tokens=32)

    def plain(m):
        nll, _ = loop._token_stats(m(tokens), targets, mask)
        return jnp.sum(nll)

    l1, g1 = nnx.value_and_grad(chunked)(model)
    l0, g0 = nnx.value_and_grad(plain)(model)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    leaves1, leaves0 = jax.tree.leaves(g1), jax.tree.leaves(g0)
    assert len(leaves1) == len(leaves0)
    for a, b in zip(leaves1, leaves0, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(np.asarray(b)).max()) + 1e-8)


def test_bfloat16_params_track_float32():
    """--param-dtype bfloat16: params stay bfloat16, the optimizer holds a float32 master copy,
    and the losses of 8 steps on one batch follow the float32-param run (same bfloat16
    compute).
    --train-accuracy adds the accuracy metric; without it the step computes none."""
    f32 = make_session(dtype="bfloat16")
    b16 = make_session(dtype="bfloat16", param_dtype="bfloat16", train_accuracy=True)
    s32, s16 = f32.init_state(), b16.init_state()
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(s16.params))
    assert isinstance(s16.opt_state, loop.MasterCopyState)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.opt_state.master))
    l32, l16 = [], []
    batch = batch_of(f32, 0)
    for _ in range(8):
        s32, m32 = f32.train_step(s32, shd.shard_batch(batch, f32.mesh))
        s16, m16 = b16.train_step(s16, shd.shard_batch(batch, b16.mesh))
        l32.append(float(m32["loss"]))
        l16.append(float(m16["loss"]))
        assert "accuracy" not in m32 and 0.0 <= float(m16["accuracy"]) <= 1.0
    assert l16[-1] < l16[0] - 0.1, (l16, l32)  # it trains
    np.testing.assert_allclose(l16, l32, rtol=0.02, err_msg=str((l16, l32)))
    # The params are the master copy rounded, and the master moved by less than a bfloat16
    # ulp somewhere (what the copy is for).
    master = host(s16.opt_state.master)
    jax.tree.map(lambda p, m: np.testing.assert_array_equal(
        np.asarray(p, np.float32), np.asarray(m.astype(jnp.bfloat16), np.float32)),
        host(s16.params), master)
    start = host(b16.init_state().params)
    moved = [np.any((m != np.asarray(p, np.float32)) & (m.astype(jnp.bfloat16) == p))
             for m, p in zip(jax.tree.leaves(master), jax.tree.leaves(start), strict=True)]
    assert any(moved)
