"""The Pallas L2 normalisation (interpret mode on the CPU) against the XLA expression, forward
and gradient, float32 and bfloat16, with a row count that no block size divides."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdelta_jax import reference
from qdelta_jax.pallas import l2norm
from qdelta_jax.testing import rel_err, tolerance


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 3, 32), (1, 7, 1, 16)])
def test_matches_reference(dtype, shape):
    x = (3.0 * jax.random.normal(jax.random.key(0), shape, jnp.float32)).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)

    def run(f):
        y, vjp = jax.vjp(f, x)
        return y, vjp(dy)[0]

    y, dx = run(lambda x: l2norm.l2_normalize(x, interpret=True))
    y_r, dx_r = run(lambda x: reference.l2_normalize(x).astype(x.dtype))
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == shape
    tol = tolerance(dtype)
    assert rel_err(y, y_r) < tol and rel_err(dx, dx_r) < tol
    norms = np.linalg.norm(np.asarray(y, np.float64), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=10 * float(jnp.finfo(dtype).eps))


def test_other_sizes_use_the_xla_expression():
    x = jax.random.normal(jax.random.key(2), (4, 24), jnp.float32)
    assert not l2norm.supported(24)
    np.testing.assert_allclose(np.asarray(l2norm.l2_normalize(x, interpret=True)),
                               np.asarray(reference.l2_normalize(x)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pair_kernel_keeps_the_inverse_norms(dtype):
    """The core's launch: both unit tensors as l2_normalize gives them and 1 / |x| float32."""
    q = (3.0 * jax.random.normal(jax.random.key(3), (2, 16, 3, 32), jnp.float32)).astype(dtype)
    k = (0.2 * jax.random.normal(jax.random.key(4), (2, 16, 3, 32), jnp.float32)).astype(dtype)
    qn, kn, rq, rk = l2norm.normalize_pair(q, k, interpret=True)
    assert qn.dtype == kn.dtype == dtype and rq.dtype == rk.dtype == jnp.float32
    assert rq.shape == rk.shape == q.shape[:-1]
    tol = tolerance(dtype)
    for x, y, r in ((q, qn, rq), (k, kn, rk)):
        assert rel_err(y, reference.l2_normalize(x).astype(dtype)) < tol
        xf = np.asarray(x, np.float64)
        want = 1.0 / np.sqrt((xf * xf).sum(-1) + l2norm.EPS)
        np.testing.assert_allclose(np.asarray(r), want, rtol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        l2norm.normalize_pair(q, k[..., :16], interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        l2norm.normalize_pair(q[..., :24], k[..., :24], interpret=True)


def test_unit_backward_is_the_vjp():
    x = 2.0 * jax.random.normal(jax.random.key(5), (5, 3, 16), jnp.float32)
    dy = jax.random.normal(jax.random.key(6), x.shape, jnp.float32)
    y, vjp = jax.vjp(reference.l2_normalize, x)
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=-1) + l2norm.EPS)
    assert rel_err(l2norm.unit_backward(y, r, dy), vjp(dy)[0]) < 1e-6


@pytest.mark.parametrize("block_k", [None, 8])
def test_op_normalises_inside_the_pallas_core(block_k):
    """``qdelta_rule(implementation="pallas")`` on raw q, k of very different scales: the core
    normalises them and its last backward kernel (whole K, or XLA after the K-slice kernel)
    returns the gradients w.r.t. the raw inputs, as the XLA path with XLA's normalisation."""
    from qdelta_jax import qdelta_rule
    from qdelta_jax.pallas import config as pcfg
    from qdelta_jax.testing import random_inputs

    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(7), 2, 40, 2, 16, 16)
    q, k = 4.0 * q, 0.1 * k
    w = jax.random.normal(jax.random.key(8), v.shape, jnp.float32)
    config = None if block_k is None else pcfg.Config(grads_k=pcfg.StageConfig(block_k=block_k))

    def grads(impl):
        def loss(q, k, v, g, beta, lam, h0):
            o, fin = qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, chunk_size=16,
                                 output_final_state=True, implementation=impl,
                                 config=config if impl == "pallas" else None)
            return jnp.sum(o * w) + jnp.sum(fin * jnp.cos(h0)), (o, fin)

        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(
            q, k, v, g, beta, lam, h0)

    ((_, out_p), gp), ((_, out_x), gx) = grads("pallas"), grads("xla")
    tol = tolerance(jnp.float32)
    for a, b in zip(out_p, out_x):
        assert rel_err(a, b) < tol
    for name, a, b in zip(("q", "k", "v", "g", "beta", "lam", "h0"), gp, gx):
        assert rel_err(a, b) < tol, name
