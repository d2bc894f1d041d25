"""The hand-written backward passes of qdelta_jax.fused against autodiff of the plain formulas
(the layer's former code), float32 and bf16 inputs, with and without document starts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdelta_jax import fused
from qdelta_jax.testing import rel_err

F32 = jnp.float32
# The forward is the same float32 computation; the gradients differ by float32 rounding (and,
# for bf16 inputs, by the final rounding of each cotangent to bf16).
TOL = {jnp.dtype(F32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}


def check(fast, plain, args, argnums, dtype, seed=0):
    key = jax.random.PRNGKey(seed)
    out = plain(*args)
    ct = jax.random.normal(key, out.shape, F32).astype(out.dtype)
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(F32) * ct.astype(F32))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(fast(*args), F32), np.asarray(out, F32))
    g_fast = jax.grad(loss(fast), argnums)(*args)
    g_plain = jax.grad(loss(plain), argnums)(*args)
    for i, a, b in zip(argnums, g_fast, g_plain):
        assert a.dtype == b.dtype == args[i].dtype
        assert rel_err(a, b) < TOL[jnp.dtype(dtype)], i


@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_rms_norms(dtype):
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k[0], (2, 7, 3, 24), F32).astype(dtype)
    gate = (2 * jax.random.normal(k[1], x.shape, F32)).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(k[2], (24,), F32)
    check(lambda x, s: fused.rms_norm(x, s, 1e-6), lambda x, s: fused.plain_rms_norm(x, s, 1e-6),
          (x, scale), (0, 1), dtype)
    check(lambda x, g, s: fused.gated_rms_norm(x, g, s, 1e-6),
          lambda x, g, s: fused.plain_gated_rms_norm(x, g, s, 1e-6), (x, gate, scale), (0, 1, 2),
          dtype)


@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("heads", [None, 3])
def test_conv_silu(dtype, packed, heads):
    k = jax.random.split(jax.random.PRNGKey(2), 2)
    B, L, C, W = 2, 13, 12, 4
    x = jax.random.normal(k[0], (B, L, C), F32).astype(dtype)
    w = 0.5 * jax.random.normal(k[1], (W, C), F32)
    # Documents of lengths 1, 5, 7 in row 0 (one token long, a boundary inside the taps) and
    # one in row 1.
    starts = (jnp.array([[0] + [1] * 5 + [6] * 7, [0] * L], jnp.int32) if packed else None)
    check(lambda x, w: fused.conv_silu(x, w, starts, heads),
          lambda x, w: fused.plain_conv_silu(x, w, starts, heads), (x, w), (0, 1), dtype)
