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
