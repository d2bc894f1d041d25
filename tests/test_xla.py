"""The chunked XLA path against the lax.scan reference: forward, final state, gradients."""

from functools import partial

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from qdelta_jax import packing, qdelta_rule, xla
from qdelta_jax.testing import random_inputs, rel_err, tolerance

ARGS = ("q", "k", "v", "g", "beta", "lam", "initial_state")


def _call(impl, inputs, chunk_size=64, cu_seqlens=None):
    q, k, v, g, beta, lam, h0 = inputs
    return qdelta_rule(
        q, k, v, g, beta, lam, initial_state=h0, output_final_state=True, implementation=impl,
        chunk_size=chunk_size, cu_seqlens=cu_seqlens,
    )


# One compilation per test instead of op-by-op dispatch: keeps the suite fast on 2 CPU cores.
run = jax.jit(_call, static_argnames=("impl", "chunk_size"))


@partial(jax.jit, static_argnames=("impl", "chunk_size"))
def grads(impl, inputs, chunk_size=64, cu_seqlens=None):
    """Gradients of a loss that mixes every output element and the final state."""

    def loss(*xs):
        o, final = _call(impl, xs, chunk_size, cu_seqlens)
        o = o.astype(jnp.float32)
        return jnp.sum(o * jnp.sin(o)) + 0.5 * jnp.sum(final * jnp.cos(final))

    return jax.grad(loss, argnums=tuple(range(7)))(*inputs)


@pytest.mark.parametrize(
    "T,K,V", [(1, 16, 16), (63, 32, 24), (64, 16, 40), (65, 24, 16), (200, 20, 36), (1000, 16, 16)]
)
def test_forward_matches_reference(T, K, V):
    inputs = random_inputs(jax.random.key(T * 7 + K), 2, T, 2, K, V)
    o_ref, f_ref = run("reference", inputs)
    o, f = run("xla", inputs)
    tol = tolerance(jnp.float32)
    assert rel_err(o, o_ref) < tol
    assert rel_err(f, f_ref) < tol


def test_chunk_sizes_agree():
    inputs = random_inputs(jax.random.key(1), 1, 150, 2, 16, 24)
    o_ref, f_ref = run("reference", inputs)
    for C in (16, 32, 64, 128):
        o, f = run("xla", inputs, chunk_size=C)
        assert rel_err(o, o_ref) < tolerance(jnp.float32), C
        assert rel_err(f, f_ref) < tolerance(jnp.float32), C


@pytest.mark.parametrize("g_scale", [0.0, 40.0])
def test_gate_extremes(g_scale):
    """No decay (g = 0) and very negative g (exp(G) underflows inside a chunk) stay exact."""
    inputs = random_inputs(jax.random.key(2), 1, 130, 2, 16, 16, g_scale=g_scale)
    if g_scale:
        assert float(jnp.min(inputs[3])) < -5.0
        assert float(jnp.sum(inputs[3][0, :64, 0])) < -200.0  # far below exp underflow
    o_ref, f_ref = run("reference", inputs)
    o, f = run("xla", inputs)
    assert np.all(np.isfinite(np.asarray(o)))
    assert rel_err(o, o_ref) < tolerance(jnp.float32)
    assert rel_err(f, f_ref) < tolerance(jnp.float32)
    gr = grads("reference", inputs, chunk_size=32)
    gx = grads("xla", inputs, chunk_size=32)
    for name, a, b in zip(ARGS, gx, gr):
        assert rel_err(a, b) < 4 * tolerance(jnp.float32), name


def test_state_chaining():
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(3), 2, 130, 2, 16, 16)
    o, f = run("xla", (q, k, v, g, beta, lam, h0))
    cut = 70
    first = [x[:, :cut] for x in (q, k, v, g, beta, lam)]
    second = [x[:, cut:] for x in (q, k, v, g, beta, lam)]
    o1, f1 = run("xla", (*first, h0))
    o2, f2 = run("xla", (*second, f1))
    assert rel_err(jnp.concatenate([o1, o2], 1), o) < tolerance(jnp.float32)
    assert rel_err(f2, f) < tolerance(jnp.float32)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_varlen_equals_per_sequence_runs(impl):
    cu = np.array([0, 10, 10, 80, 81, 150], np.int32)  # includes an empty sequence
    N, T = len(cu) - 1, int(cu[-1])
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.key(4), 1, T, 2, 16, 12)
    h0 = jax.random.normal(jax.random.key(5), (N, 2, 16, 12))
    o, f = run(impl, (q, k, v, g, beta, lam, h0), cu_seqlens=jnp.asarray(cu), chunk_size=16)
    for n in range(N):
        s, e = cu[n], cu[n + 1]
        if e == s:
            np.testing.assert_array_equal(f[n], h0[n])
            continue
        part = [x[:, s:e] for x in (q, k, v, g, beta, lam)]
        o_n, f_n = run("reference", (*part, h0[n : n + 1]))
        assert rel_err(o[:, s:e], o_n) < tolerance(jnp.float32)
        assert rel_err(f[n : n + 1], f_n) < tolerance(jnp.float32)


def test_varlen_gradients():
    cu = jnp.asarray([0, 10, 10, 80, 81, 150], jnp.int32)
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.key(6), 1, 150, 2, 8, 12)
    h0 = jax.random.normal(jax.random.key(7), (5, 2, 8, 12))
    inputs = (q, k, v, g, beta, lam, h0)
    gr = grads("reference", inputs, cu_seqlens=cu)
    gx = grads("xla", inputs, cu_seqlens=cu, chunk_size=16)
    for name, a, b in zip(ARGS, gx, gr):
        assert rel_err(a, b) < tolerance(jnp.float32), name


@pytest.mark.parametrize("T,K,V,C", [(1, 8, 8, 16), (65, 16, 24, 32), (200, 20, 12, 64)])
def test_gradients_match_reference_autodiff(T, K, V, C):
    inputs = random_inputs(jax.random.key(T + V), 2, T, 2, K, V)
    gr = grads("reference", inputs)
    gx = grads("xla", inputs, chunk_size=C)
    for name, a, b in zip(ARGS, gx, gr):
        assert rel_err(a, b) < tolerance(jnp.float32), name


def test_check_grads_float64():
    with jax.enable_x64(True):
        inputs = random_inputs(jax.random.key(8), 1, 11, 2, 4, 3, dtype=jnp.float64)
        inputs = tuple(x.astype(jnp.float64) for x in inputs)

        def f(q, k, v, g, beta, lam, h0):
            return _call("xla", (q, k, v, g, beta, lam, h0), chunk_size=4)

        jax.test_util.check_grads(f, inputs, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_bfloat16_within_dtype_tolerance():
    inputs = random_inputs(jax.random.key(9), 2, 200, 2, 32, 48, dtype=jnp.bfloat16)
    o_ref, f_ref = run("reference", inputs)
    o, f = run("xla", inputs)
    assert o.dtype == jnp.bfloat16 and f.dtype == jnp.float32
    tol = tolerance(jnp.bfloat16)
    assert rel_err(o, o_ref) < tol
    assert rel_err(f, f_ref) < tol
    gr = grads("reference", inputs)
    gx = grads("xla", inputs)
    for name, a, b in zip(ARGS, gx, gr):
        assert a.dtype == b.dtype
        assert rel_err(a, b) < tol, name


def test_jit_vmap_and_grad_of_jit():
    inputs = random_inputs(jax.random.key(10), 1, 40, 2, 8, 8)
    o_ref, _ = run("reference", inputs)
    f = jax.jit(lambda *xs: _call("xla", xs, chunk_size=16)[0])
    assert rel_err(f(*inputs), o_ref) < tolerance(jnp.float32)
    stacked = [jnp.stack([x, 0.5 * x]) for x in inputs]
    ov = jax.vmap(lambda *xs: _call("xla", xs, chunk_size=16)[0])(*stacked)
    o_half, _ = run("reference", [0.5 * x for x in inputs])
    assert rel_err(ov[0], o_ref) < tolerance(jnp.float32)
    assert rel_err(ov[1], o_half) < tolerance(jnp.float32)
    gj = jax.grad(lambda *xs: jnp.sum(f(*xs) ** 2), argnums=(0, 2))(*inputs)
    gr = jax.grad(lambda *xs: jnp.sum(_call("reference", xs)[0] ** 2), argnums=(0, 2))(*inputs)
    for a, b in zip(gj, gr):
        assert rel_err(a, b) < tolerance(jnp.float32)


def test_backward_keeps_no_per_chunk_states():
    """Residuals between forward and backward: the inputs and per-sequence states only."""
    B, T, H, K, V, C = 2, 256, 2, 16, 32, 32
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(11), B, T, H, K, V)
    layout = packing.make_layout(B, T, C, None)
    meta = layout.meta
    G = packing.chunk_cumsum(g, C)
    args = (q, k, v, G, beta, lam, h0, meta.reset, meta.is_last, meta.seq)
    _, vjp = jax.vjp(lambda *a: xla.chunked_core(*a[:7], None, *args[7:], 0.25), *args[:7])
    res_leaves = [x for x in jax.tree_util.tree_leaves(vjp) if hasattr(x, "size")]
    total = sum(int(x.size) for x in res_leaves)
    inputs_size = sum(int(x.size) for x in args)
    assert total <= inputs_size + 1024, (total, inputs_size)


def test_grouped_local_gradients_equal_one_group(monkeypatch):
    """The backward computes local gradients a group of chunks at a time on large inputs; force
    small groups (with a remainder) here and compare with the reference."""
    inputs = random_inputs(jax.random.key(12), 1, 5 * 16 + 3, 2, 8, 8)
    monkeypatch.setattr(xla, "_GRAD_GROUP_BYTES", 1)  # one chunk per group: 6 groups
    gx = grads("xla", inputs, chunk_size=16)
    monkeypatch.setattr(xla, "_GRAD_GROUP_BYTES", 2 * 8 * 16 * 16 * 4 * 12 * 4)  # 4 + remainder 2
    gx4 = jax.jit(jax.grad(lambda *xs: jnp.sum(_call("xla", xs, chunk_size=16)[0] ** 2)))(*inputs)
    gr = grads("reference", inputs)
    gr4 = jax.grad(lambda *xs: jnp.sum(_call("reference", xs)[0] ** 2))(*inputs)
    for name, a, b in zip(ARGS, gx, gr):
        assert rel_err(a, b) < tolerance(jnp.float32), name
    assert rel_err(gx4, gr4) < tolerance(jnp.float32)


def test_cpu_chunk_solve_avoids_the_blocking_kernel_and_matches_it():
    """On the CPU the chunk solve avoids jaxlib's LAPACK trsm (whose batched kernel can deadlock
    XLA:CPU's thread pool, see xla.unit_lower_inverse) and computes the same inverse."""
    A = 0.2 * jnp.tril(jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 64, 64), minval=-1.0,
                                          maxval=1.0), -1)
    target = 'custom_call_target="lapack_strsm'
    assert target in jax.jit(xla._inverse_trsm).lower(A).compile().as_text()  # what it avoids
    assert target not in jax.jit(xla.unit_lower_inverse).lower(A).compile().as_text()
    T = xla.unit_lower_inverse(A)
    eye = jnp.eye(64)
    np.testing.assert_allclose(np.asarray(jnp.matmul(eye + A, T, precision="highest")),
                               np.broadcast_to(np.eye(64), A.shape), atol=1e-4)
    T_ref = xla._inverse_trsm(A)
    assert float(jnp.max(jnp.abs(T - T_ref)) / jnp.max(jnp.abs(T_ref))) < 1e-6


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_minus_infinity_decay_is_a_reset(impl):
    """g = -inf zeroes the state exactly (as the recurrence does): the chunked paths stay finite
    and equal the reference, forward and gradients."""
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(21), 1, 40, 2, 16, 16)
    g = g.at[0, 5, 0].set(-jnp.inf).at[0, 20, :].set(-jnp.inf).at[0, 33, 1].set(-1e30)
    inputs = (q, k, v, g, beta, lam, h0)
    gr = grads("reference", inputs)
    gx = grads(impl, inputs, chunk_size=16)
    o_r, f_r = _call("reference", inputs)
    o_x, f_x = _call(impl, inputs, chunk_size=16)
    assert rel_err(o_x, o_r) < tolerance(jnp.float32) and rel_err(f_x, f_r) < tolerance(jnp.float32)
    for name, a, b in zip(ARGS, gx, gr):
        assert rel_err(a, b) < 2 * tolerance(jnp.float32), name
