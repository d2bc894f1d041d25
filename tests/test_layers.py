"""Tests of :mod:`qdelta_jax.layers`: the layer against an independent NumPy float64 layer, the
gated-delta-rule and DeltaNet reductions, decoding, packed documents, Linen interop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from qdelta_jax.layers import GatedRMSNorm, QDelta, RMSNorm, ShortConv, qdelta_linen
from qdelta_jax.testing import rel_err

D, H, K = 32, 2, 16


def rel(a, b) -> float:
    return rel_err(a, b, ord=np.inf)  # the error of the largest entry, relative to it


def make(seed=0, **kw) -> QDelta:
    kw.setdefault("chunk_size", 16)
    return QDelta(D, H, K, rngs=nnx.Rngs(seed), **kw)


def inputs(B=2, T=29, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


# Compiled entry points, shared by the tests (eager dispatch of the chunked op is slow on CPU;
# layers built with the same options share a graph definition, hence one compilation).
@nnx.jit(static_argnames=("return_aux",))
def apply(layer, x, cu_seqlens=None, mask=None, return_aux=False):
    return layer(x, cu_seqlens=cu_seqlens, mask=mask, return_aux=return_aux)


@nnx.jit
def apply_cached(layer, x, cache, mask=None):
    return layer(x, cache=cache, mask=mask)


# ----------------------------------------------------------------------------- NumPy oracle


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def _silu(z):
    return z * _sig(z)


def _softplus(z):
    return np.logaddexp(0.0, z)


def np_qdelta_loop(q, k, v, g, beta, lam, scale):
    """docs/MATH.md section 1, written out per token (float64)."""
    B, T, Hv, Kd = q.shape
    S = np.zeros((B, Hv, Kd, v.shape[-1]))
    o = np.zeros(v.shape)
    for t in range(T):
        x = k[:, t] + lam[:, t, :, None] * q[:, t]
        S = np.exp(g[:, t])[..., None, None] * S
        e = v[:, t] - np.einsum("bhkv,bhk->bhv", S, x)
        S = S + beta[:, t, :, None, None] * k[:, t, :, :, None] * e[:, :, None, :]
        o[:, t] = scale * np.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o


def np_gated_delta_loop(q, k, v, g, beta, scale):
    """Gated DeltaNet, written independently: S = a (I - beta k k^T) S + beta k v^T."""
    B, T, Hv, Kd = q.shape
    o = np.zeros(v.shape)
    for b in range(B):
        for h in range(Hv):
            S = np.zeros((Kd, v.shape[-1]))
            for t in range(T):
                kt = k[b, t, h]
                S = np.exp(g[b, t, h]) * (np.eye(Kd) - beta[b, t, h] * np.outer(kt, kt)) @ S
                S = S + beta[b, t, h] * np.outer(kt, v[b, t, h])
                o[b, t, h] = scale * S.T @ q[b, t, h]
    return o


def np_layer(layer: QDelta, x, rule="qdelta"):
    """The layer in float64 NumPy from its parameters (docs/MATH.md section 4)."""
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    Hq, Hv, Kd, Vd = layer.num_heads, layer.num_v_heads, layer.head_dim, layer.head_v_dim

    def w(mod):
        return np.asarray(mod.kernel[...], np.float64)

    def conv(z, mod):
        if mod is None:
            return z
        ker = w(mod)
        zp = np.pad(z, ((0, 0), (ker.shape[0] - 1, 0), (0, 0)))
        return sum(ker[i] * zp[:, i : i + T] for i in range(ker.shape[0]))

    def l2(z):
        return z / np.sqrt(np.sum(z * z, -1, keepdims=True) + 1e-6)

    q = l2(_silu(conv(x @ w(layer.q_proj), layer.q_conv1d)).reshape(B, T, Hq, Kd))
    k = l2(_silu(conv(x @ w(layer.k_proj), layer.k_conv1d)).reshape(B, T, Hq, Kd))
    v = _silu(conv(x @ w(layer.v_proj), layer.v_conv1d)).reshape(B, T, Hv, Vd)
    q, k = np.repeat(q, Hv // Hq, axis=2), np.repeat(k, Hv // Hq, axis=2)
    mult = 2.0 if layer.allow_neg_eigval else 1.0
    beta = mult * _sig(x @ w(layer.b_proj))
    if layer.fixed_lam is None:
        lam = mult * _sig(x @ w(layer.lam_proj) - layer.lam_bias)
    else:
        lam = np.full(beta.shape, layer.fixed_lam)
    if layer.use_decay:
        A = np.exp(np.asarray(layer.A_log[...], np.float64))
        g = -A * _softplus(x @ w(layer.a_proj) + np.asarray(layer.dt_bias[...], np.float64))
    else:
        g = np.zeros(beta.shape)
    scale = Kd**-0.5
    if rule == "qdelta":
        o = np_qdelta_loop(q, k, v, g, beta, lam, scale)
    else:
        o = np_gated_delta_loop(q, k, v, g, beta, scale)
    o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * np.asarray(layer.o_norm.scale[...])
    if layer.use_gate:
        o = o * _silu((x @ w(layer.g_proj)).reshape(B, T, Hv, Vd))
    return o.reshape(B, T, Hv * Vd) @ w(layer.o_proj)


# ----------------------------------------------------------------------------- parts


def test_short_conv_matches_causal_conv_and_cache():
    conv = ShortConv(5, 4, std=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 11, 5))
    y, cache = conv(x)
    ker = np.asarray(conv.kernel[...])
    xn = np.asarray(x)
    for t in range(11):
        want = sum(ker[i] * xn[:, t - 3 + i] for i in range(4) if t - 3 + i >= 0)
        np.testing.assert_allclose(y[:, t], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache, x[:, -3:])
    # The same result in pieces through the cache (prefill 6, then single tokens).
    y1, c = conv(x[:, :6])
    parts = [y1]
    for t in range(6, 11):
        yt, c = conv(x[:, t : t + 1], c)
        parts.append(yt)
    np.testing.assert_allclose(jnp.concatenate(parts, 1), y, rtol=1e-6, atol=1e-7)
    # Document starts: taps never reach before the document's first token.
    starts = jnp.array([[0] * 4 + [4] * 7, [0] * 11])
    ys, _ = conv(x, starts=starts)
    y_doc, _ = conv(x[:1, 4:])
    np.testing.assert_allclose(ys[0, 4:], y_doc[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ys[1], y[1], rtol=1e-6)


def test_norms():
    x = jax.random.normal(jax.random.key(0), (3, 8))
    gate = jax.random.normal(jax.random.key(1), (3, 8))
    r = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(RMSNorm(8)(x), r, rtol=1e-5)
    np.testing.assert_allclose(GatedRMSNorm(8)(x, gate), r * _silu(np.asarray(gate)), rtol=1e-5)


def test_init_of_decay_parameters():
    layer = QDelta(D, 4, 8, num_v_heads=64, rngs=nnx.Rngs(3))
    A = np.exp(np.asarray(layer.A_log[...]))
    assert np.all(A > 0) and np.all(A < 16) and A.std() > 2
    dt = np.log1p(np.exp(np.asarray(layer.dt_bias[...], np.float64)))  # softplus(dt_bias) = dt
    assert np.all(dt >= 1e-4 * (1 - 1e-5)) and np.all(dt <= 0.1 * (1 + 1e-5))
    assert np.asarray(layer.q_proj.kernel[...]).std() == pytest.approx(0.02, rel=0.1)


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_v_heads=4),  # grouped value heads
        dict(allow_neg_eigval=True, use_gate=False, use_short_conv=False, expand_v=1.5),
    ],
    ids=["default", "grouped", "negeig_nogate_noconv"],
)
def test_layer_matches_numpy_oracle(kw):
    layer = make(**kw)
    x = inputs()
    assert rel(apply(layer, x), np_layer(layer, x)) < 2e-5


def test_fixed_lam_zero_is_gated_deltanet_and_learned_lam_differs():
    x = inputs()
    gdn = make(fixed_lam=0.0)
    assert "lam_proj" not in nnx.state(gdn, nnx.Param)
    want = np_layer(gdn, x, rule="gated_delta")
    assert rel(apply(gdn, x), want) < 2e-5
    # DeltaNet: no decay either.
    dn = make(fixed_lam=0.0, use_decay=False)
    assert "A_log" not in nnx.state(dn, nnx.Param)
    assert rel(apply(dn, x), np_layer(dn, x, rule="gated_delta")) < 2e-5
    # The same parameters with learned lam compute something else.
    learned = make()
    nnx.update(learned, nnx.state(gdn, nnx.Param))  # copies every shared parameter
    assert rel(apply(learned, x), want) > 1e-2
    assert rel(apply(make(fixed_lam=0.5), x), want) > 1e-2


def test_allow_neg_eigval_doubles_beta_and_lam():
    x = inputs()
    _, a = apply(make(), x, return_aux=True)
    _, b = apply(make(allow_neg_eigval=True), x, return_aux=True)
    np.testing.assert_allclose(b["beta"], 2 * a["beta"], rtol=1e-6)
    np.testing.assert_allclose(b["lam"], 2 * a["lam"], rtol=1e-6)
    assert float(b["beta"].max()) < 2 and float(b["beta"].min()) > 0


def test_aux_for_stability_diagnostic():
    layer = make(num_v_heads=4)
    y, aux = apply(layer, inputs(), return_aux=True)
    assert aux["q"].shape == aux["k"].shape == (2, 29, 4, K)
    assert aux["beta"].shape == aux["lam"].shape == aux["g"].shape == (2, 29, 4)
    # Normalised as the op normalises: x / sqrt(|x|^2 + 1e-6), so norms are at most 1.
    norms = jnp.linalg.norm(aux["k"], axis=-1)
    assert float(norms.max()) <= 1.0 + 1e-5 and float(norms.min()) > 0.5
    c = aux["beta"] * jnp.sum(aux["k"] * (aux["k"] + aux["lam"][..., None] * aux["q"]), -1)
    assert bool(jnp.all(jnp.isfinite(c)))


@pytest.mark.parametrize("kw", [dict(), dict(num_v_heads=4, allow_neg_eigval=True)],
                         ids=["default", "grouped_negeig"])
def test_decode_matches_forward(kw):
    layer = make(**kw)
    x = inputs()
    full = apply(layer, x)
    y, cache = apply_cached(layer, x[:, :19], layer.init_cache(2))  # prefill: chunked op
    parts = [y]
    for t in range(19, 29):  # one-token steps: reference.qdelta_step
        yt, cache = apply_cached(layer, x[:, t : t + 1], cache)
        parts.append(yt)
    assert rel(jnp.concatenate(parts, 1), full) < 1e-5
    # A second prefill on top of a cache continues the same function.
    y2, _ = apply_cached(layer, x[:, 19:], apply_cached(layer, x[:, :19], layer.init_cache(2))[1])
    assert rel(y2, full[:, 19:]) < 1e-5


def test_mask_leaves_state_untouched():
    layer = make()
    x = inputs(B=1, T=12)
    pad = jnp.concatenate([inputs(B=1, T=5, seed=9), x], axis=1)
    mask = jnp.arange(17)[None] >= 5
    y_pad, c_pad = apply_cached(layer, pad, layer.init_cache(1), mask)
    y, c = apply_cached(layer, x, layer.init_cache(1))
    assert rel(y_pad[:, 5:], y) < 1e-5
    for a, b in zip(jax.tree.leaves(c_pad), jax.tree.leaves(c), strict=True):
        assert rel(a, b) < 1e-5


def test_packed_documents_equal_separate_runs():
    layer = make(num_v_heads=4)
    x = inputs(B=2, T=29)
    # Row 0: documents of 13, 0 (empty) and 16 tokens; row 1: one of 29, padded by repeating T.
    cu = jnp.array([[0, 13, 13, 29], [0, 29, 29, 29]])
    y = apply(layer, x, cu)
    sep = apply(layer, jnp.concatenate([x[:1, 13:], x[:1, :16]], 0))  # doc 2, doc 1 + 3 more
    assert rel(y[0, :13], sep[1, :13]) < 1e-5 and rel(y[0, 13:], sep[0]) < 1e-5
    assert rel(y[1], apply(layer, x)[1]) < 1e-5
    # 1-D offsets with B == 1 agree; so does the reference implementation (a lax.scan).
    assert rel(apply(layer, x[:1], cu[0]), y[:1]) < 1e-6
    ref = make(num_v_heads=4, implementation="reference")
    assert rel(apply(ref, x, cu), y) < 1e-5


def test_bad_cu_seqlens_and_arguments():
    layer = make()
    x = inputs(B=2, T=10)
    with pytest.raises(ValueError, match="must end at the sequence length T = 10"):
        layer(x, cu_seqlens=jnp.array([[0, 5, 9], [0, 5, 10]]))
    with pytest.raises(ValueError, match="batch size must be 1"):
        layer(x, cu_seqlens=jnp.array([0, 5, 10]))
    with pytest.raises(ValueError, match="cannot be combined"):
        layer(x, cu_seqlens=jnp.array([[0, 10], [0, 10]]), cache=layer.init_cache(2))
    with pytest.raises(ValueError, match="num_v_heads"):
        make(num_v_heads=3)
    with pytest.raises(ValueError, match="implementation"):
        make(implementation="cuda")
    with pytest.raises(ValueError, match="save_residuals"):
        make(save_residuals="no")
    with pytest.raises(ValueError, match="guard_nonfinite"):
        make(guard_nonfinite=1)


def spy_on_op(monkeypatch, name: str) -> list:
    """The values of the op's keyword ``name`` in every call the layers make from now on."""
    from qdelta_jax import ops

    seen = []
    real = ops.qdelta_rule

    def spy(*a, **kw):
        seen.append(kw.get(name))
        return real(*a, **kw)

    monkeypatch.setattr(ops, "qdelta_rule", spy)
    return seen


def test_save_residuals_reaches_the_op_as_its_config(monkeypatch):
    from qdelta_jax.pallas.config import Config

    seen = spy_on_op(monkeypatch, "config")
    x = inputs(B=1, T=8)
    make(save_residuals=False)(x)
    make()(x)
    assert seen == [Config(save_residuals=False), None]


def test_guard_nonfinite_reaches_the_op(monkeypatch):
    """The layer's and the model config's ``guard_nonfinite`` is the op's (off by default);
    with it on, a NaN in the layer's input leaves the earlier tokens of its chunk finite."""
    seen = spy_on_op(monkeypatch, "guard_nonfinite")
    x = inputs(B=1, T=12).at[0, 9, 0].set(jnp.nan)
    on = make(guard_nonfinite=True, implementation="xla", chunk_size=16)(x)
    off = make(implementation="xla", chunk_size=16)(x)
    assert seen == [True, False]
    assert np.isfinite(np.asarray(on[0, :9])).all() and not np.isfinite(np.asarray(on[0, 9])).all()
    assert not np.isfinite(np.asarray(off[0, :9])).all()
    from qdelta_jax.model import QDeltaConfig
    with pytest.raises(ValueError, match="guard_nonfinite"):
        QDeltaConfig(guard_nonfinite="yes")


def test_reference_and_xla_implementations_agree():
    x = inputs()
    a, b = make(implementation="reference"), make(implementation="xla")

    @nnx.jit
    def loss_and_grad(m):
        return nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(m)

    (la, ga), (lb, gb) = loss_and_grad(a), loss_and_grad(b)
    assert rel(lb, la) < 1e-5
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        assert rel(v, u) < 1e-4


def test_bfloat16_compute_float32_params():
    layer = make(dtype=jnp.bfloat16)
    x = inputs()
    y = apply(layer, x)
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert rel(y, apply(make(), x)) < 5e-2


def test_linen_wrapper_trains_one_step():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(D)(x)
            # The scan implementation: this test is about the bridge, and it compiles faster.
            h = h + qdelta_linen(D, H, K, implementation="reference", name="mixer")(h)
            return nn.Dense(1)(h)

    x = inputs()
    target = jnp.ones((2, 29, 1))
    net = Net()
    params = jax.jit(net.init)(jax.random.key(0), x)["params"]
    assert {"A_log", "dt_bias", "q_proj"} <= set(params["mixer"])

    def loss_fn(p):
        return jnp.mean((net.apply({"params": p}, x) - target) ** 2)

    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    loss0, grads = value_and_grad(params)
    assert float(jnp.abs(nn.unbox(grads["mixer"]["A_log"])).sum()) > 0
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    assert float(value_and_grad(params)[0]) < float(loss0)
