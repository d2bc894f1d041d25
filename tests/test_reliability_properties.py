"""Property-based tests (hypothesis) of the public ``qdelta_rule``: the chunked XLA path equals the
reference scan, forward (output and final state) and gradients, over two small shapes, float32
and bfloat16, chunk sizes, packed sequences (empty ones included), lam ranges and gates g in
[-20, 0]."""

from __future__ import annotations

import functools

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

# Two shape buckets (packed: one row of 4 sequences, empty ones allowed; unpacked: two rows) with
# K, V not powers of two and T not a multiple of the chunk. Everything else hypothesis draws is a
# value (seeds, gate ranges, packing offsets), passed as an argument of one compiled program, so
# the examples share a handful of compilations.
SHAPES = {True: (1, 37, 2, 8, 12), False: (2, 19, 1, 5, 3)}
N_PACKED = 4


@st.composite
def cases(draw):
    packed = draw(st.booleans())
    T = SHAPES[packed][1]
    cuts = sorted(draw(st.lists(st.integers(0, T), min_size=N_PACKED - 1,
                                max_size=N_PACKED - 1)))
    return dict(
        packed=packed, cu=[0, *cuts, T], chunk=draw(st.sampled_from([8, 16])),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        g_min=draw(st.floats(-20.0, 0.0)), lam_max=draw(st.sampled_from([0.0, 1.0, 2.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def inputs_of(c):
    B, T, H, K, V = SHAPES[c["packed"]]
    ks = jax.random.split(jax.random.key(c["seed"]), 7)
    dt = jnp.dtype(c["dtype"])
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(dt)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(dt)
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(dt)
    g = jax.random.uniform(ks[3], (B, T, H), minval=c["g_min"], maxval=0.0)
    beta = jax.random.uniform(ks[4], (B, T, H))
    lam = jax.random.uniform(ks[5], (B, T, H), maxval=c["lam_max"])
    N = N_PACKED if c["packed"] else B
    h0 = 0.5 * jax.random.normal(ks[6], (N, H, K, V))
    return q, k, v, g, beta, lam, h0


@functools.cache
def compiled(impl: str, packed: bool, chunk: int):
    """Outputs, final state and the gradients of a fixed random projection of both."""

    def run(args, cu, o_w, f_w):
        def loss(*a):
            o, fs = qdelta_rule(*a[:6], initial_state=a[6], output_final_state=True,
                                cu_seqlens=cu if packed else None, chunk_size=chunk,
                                implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * o_w) + jnp.sum(fs * f_w), (o, fs)

        (_, (o, fs)), grads = jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)(
            *args)
        return o, fs, grads

    return jax.jit(run)


@SETTINGS
@given(cases())
def test_xla_equals_reference(c):
    args = inputs_of(c)
    dt = jnp.dtype(c["dtype"])
    tol = tolerance(dt, args[0].shape[1])
    cu = jnp.asarray(c["cu"], jnp.int32)
    o_w = jax.random.normal(jax.random.key(1), args[2].shape)
    f_w = jax.random.normal(jax.random.key(2), args[6].shape)
    # The reference has no chunks: one compilation serves every chunk size.
    o_ref, f_ref, g_ref = compiled("reference", c["packed"], 16)(args, cu, o_w, f_w)
    o, f, g_x = compiled("xla", c["packed"], c["chunk"])(args, cu, o_w, f_w)
    assert o.dtype == dt and f.dtype == jnp.float32
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(f)).all()
    assert rel_err(o, o_ref) < tol, c
    assert rel_err(f, f_ref) < tol, c
    # Gradients pass through one more chain of products than the forward: 4 units.
    for name, a, b in zip(("q", "k", "v", "g", "beta", "lam", "h0"), g_x, g_ref, strict=True):
        assert rel_err(a, b) < 4 * tol, (name, c)
