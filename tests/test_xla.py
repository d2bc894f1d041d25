"""The chunked XLA path: the shared op suite (:mod:`op_suite`, against the reference scan), and
what only this path has (its residuals, grouped local gradients, the CPU chunk solve)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from op_suite import OpSuite

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


class TestXla(OpSuite):
    implementation = "xla"


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
