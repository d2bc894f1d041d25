"""Property-based tests (hypothesis) of the public ``qdelta_rule``: the chunked XLA path equals the
reference scan, forward (output and final state) and gradients, over small random shapes, float32
and bfloat16, chunk sizes, packed sequences (empty ones included) and gates g in [-20, 0]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")  # in the test extra
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qdelta_jax import qdelta_rule  # noqa: E402
from qdelta_jax.testing import rel_err, tolerance  # noqa: E402

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, print_blob=True)


@st.composite
def cases(draw):
    packed = draw(st.booleans())
    B = 1 if packed else draw(st.integers(1, 2))
    T = draw(st.integers(1, 40))
    cu = None
    if packed:
        cuts = sorted(draw(st.lists(st.integers(0, T), min_size=0, max_size=3)))
        cu = [0, *cuts, T]
    return dict(
        B=B, T=T, H=draw(st.integers(1, 2)), K=draw(st.sampled_from([2, 5, 8, 16])),
        V=draw(st.sampled_from([3, 8, 12])), chunk=draw(st.sampled_from([8, 16, 32])),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])), cu=cu,
        g_min=draw(st.floats(-20.0, 0.0)), lam_max=draw(st.sampled_from([0.0, 1.0, 2.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def inputs_of(c):
    B, T, H, K, V = c["B"], c["T"], c["H"], c["K"], c["V"]
    ks = jax.random.split(jax.random.key(c["seed"]), 7)
    dt = jnp.dtype(c["dtype"])
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(dt)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(dt)
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(dt)
    g = jax.random.uniform(ks[3], (B, T, H), minval=c["g_min"], maxval=0.0)
    beta = jax.random.uniform(ks[4], (B, T, H))
    lam = jax.random.uniform(ks[5], (B, T, H), maxval=c["lam_max"])
    N = len(c["cu"]) - 1 if c["cu"] is not None else B
    h0 = 0.5 * jax.random.normal(ks[6], (N, H, K, V))
    return q, k, v, g, beta, lam, h0


def op(c, impl):
    cu = None if c["cu"] is None else jnp.asarray(c["cu"], jnp.int32)

    def f(q, k, v, g, beta, lam, h0):
        return qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, output_final_state=True,
                           cu_seqlens=cu, chunk_size=c["chunk"], implementation=impl)

    return f


def loss_grads(c, impl, args):
    o_w = jax.random.normal(jax.random.key(1), args[2].shape[:-1] + (c["V"],))
    f_w = jax.random.normal(jax.random.key(2), args[6].shape)

    def loss(*a):
        o, fs = op(c, impl)(*a)
        return jnp.sum(o.astype(jnp.float32) * o_w) + jnp.sum(fs * f_w)

    return jax.grad(loss, argnums=tuple(range(7)))(*args)


@SETTINGS
@given(cases())
def test_xla_equals_reference(c):
    args = inputs_of(c)
    dt = jnp.dtype(c["dtype"])
    tol = tolerance(dt, c["T"])
    o_ref, f_ref = jax.jit(op(c, "reference"))(*args)
    o, f = jax.jit(op(c, "xla"))(*args)
    assert o.dtype == dt and f.dtype == jnp.float32
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(f)).all()
    assert rel_err(o, o_ref) < tol, c
    assert rel_err(f, f_ref) < tol, c
    g_ref = jax.jit(lambda *a: loss_grads(c, "reference", a))(*args)
    g_x = jax.jit(lambda *a: loss_grads(c, "xla", a))(*args)
    # Gradients pass through one more chain of products than the forward: 4 units.
    for name, a, b in zip(("q", "k", "v", "g", "beta", "lam", "h0"), g_x, g_ref, strict=True):
        assert rel_err(a, b) < 4 * tol, (name, c)
