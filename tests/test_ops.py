"""qdelta_rule's input checks, dispatch and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdelta_jax import default_implementation, qdelta_rule
from qdelta_jax.testing import random_inputs

B, T, H, K, V = 1, 20, 2, 8, 12


@pytest.fixture
def inputs():
    return random_inputs(jax.random.key(0), B, T, H, K, V)


def call(inputs, **overrides):
    names = ("q", "k", "v", "g", "beta", "lam")
    args = dict(zip(names, inputs[:6]))
    kw = {}
    for key, val in overrides.items():
        if key in args:
            args[key] = val
        else:
            kw[key] = val
    return qdelta_rule(*(args[n] for n in names), **kw)


def test_default_implementation_on_cpu():
    assert default_implementation() == ("pallas" if jax.default_backend() == "gpu" else "xla")


def test_output_dtype_and_final_state(inputs):
    o, final = call(inputs)
    assert o.shape == (B, T, H, V) and o.dtype == jnp.float32 and final is None
    o, final = call(inputs, output_final_state=True)
    assert final.shape == (B, H, K, V) and final.dtype == jnp.float32
    bf = [x.astype(jnp.bfloat16) for x in inputs[:3]]
    o, _ = call(inputs, q=bf[0], k=bf[1], v=bf[2])
    assert o.dtype == jnp.bfloat16


def test_scale_touches_output_only(inputs):
    o1, f1 = call(inputs, scale=1.0, output_final_state=True)
    o2, f2 = call(inputs, scale=2.0, output_final_state=True)
    np.testing.assert_allclose(o2, 2 * o1, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(f1, f2)


def test_normalize_qk_flag(inputs):
    q, k = inputs[0], inputs[1]
    from qdelta_jax import l2_normalize

    o1, _ = call(inputs)
    o2, _ = call(inputs, q=l2_normalize(q), k=l2_normalize(k), normalize_qk=False)
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-6)
    o3, _ = call(inputs, normalize_qk=False)
    assert float(jnp.abs(o3 - o1).max()) > 1e-3


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(q=jnp.zeros((B, T, H))), r"q must have shape \[B, T, H, K\]"),
        (
            dict(k=jnp.zeros((B, T, H, K + 1))),
            r"k must have shape \[B, T, H, K\] = \[1, 20, 2, 8\]",
        ),
        (dict(v=jnp.zeros((B, T + 1, H, V))), r"v must have shape \[B, T, H, V\]"),
        (dict(g=jnp.zeros((B, T, H, 1))), r"g must have shape \[B, T, H\] = \[1, 20, 2\]"),
        (dict(beta=jnp.zeros((B, T))), r"beta must have shape \[B, T, H\]"),
        (dict(lam=jnp.zeros((B, T + 2, H))), r"lam must have shape"),
        (dict(chunk_size=48), r"chunk_size must be a power of two.*48"),
        (dict(chunk_size=0), r"chunk_size must be a power of two"),
        (dict(implementation="cuda"), r"implementation must be one of .*'cuda'"),
        (
            dict(initial_state=jnp.zeros((B, H, V, K))),
            r"initial_state must have shape \[N, H, K, V\]",
        ),
        (dict(scale=float("nan")), r"scale must be a finite float"),
        (dict(cu_seqlens=jnp.array([0, 5, 3, 20])), r"cu_seqlens must be non-decreasing"),
        (dict(cu_seqlens=jnp.array([0, 5, 19])), r"cu_seqlens must end at .* T = 20"),
        (dict(cu_seqlens=jnp.array([1, 5, 20])), r"cu_seqlens must start at 0"),
        (dict(cu_seqlens=jnp.zeros((1, 1, 2), jnp.int32)),
         r"cu_seqlens must have shape \[N\+1\] \(B == 1\) or \[B, S\+1\]"),
        (dict(cu_seqlens=jnp.array([[0, 20], [0, 20]])),
         r"per-row cu_seqlens must have shape \[B, S\+1\] = \[1, S\+1\]"),
        (dict(cu_seqlens=jnp.array([[0, 5, 19]])), r"cu_seqlens must end at .* T = 20"),
        (
            dict(cu_seqlens=jnp.array([0, 5, 20]), initial_state=jnp.zeros((1, H, K, V))),
            r"initial_state must have shape \[N, H, K, V\] = \[2, 2, 8, 12\]",
        ),
    ],
)
def test_value_errors_name_the_argument(inputs, override, match):
    with pytest.raises(ValueError, match=match):
        call(inputs, **override)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(q=jnp.zeros((B, T, H, K), jnp.int32)), r"q must have a floating dtype.*int32"),
        (dict(beta=jnp.zeros((B, T, H), jnp.bool_)), r"beta must have a floating dtype"),
        (
            dict(initial_state=jnp.zeros((B, H, K, V), jnp.int32)),
            r"initial_state must have a float",
        ),
        (dict(cu_seqlens=jnp.array([0.0, 20.0])), r"cu_seqlens must have an integer dtype"),
        (dict(v=[[1.0]]), r"v must be an array"),
    ],
)
def test_type_errors_name_the_argument(inputs, override, match):
    with pytest.raises(TypeError, match=match):
        call(inputs, **override)


def test_cu_seqlens_needs_batch_one():
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.key(1), 2, T, H, K, V)
    with pytest.raises(ValueError, match=r"batch size must\s+be 1 .*got batch size 2"):
        qdelta_rule(q, k, v, g, beta, lam, cu_seqlens=jnp.array([0, 20]))
    # Per-row offsets take any batch size. (Jitted: one compilation instead of op-by-op.)
    run = jax.jit(lambda cu, *xs: qdelta_rule(*xs, cu_seqlens=cu, implementation="xla")[0])
    o = run(jnp.array([[0, 20], [0, 20]]), q, k, v, g, beta, lam)
    o1 = run(None, q, k, v, g, beta, lam)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o1), rtol=1e-5, atol=1e-6)


def test_checks_cost_nothing_at_run_time(inputs):
    """Checks read shapes at trace time: the jitted function is compiled once, and the traced
    cu_seqlens values are accepted without a host round trip."""
    traces = []

    @jax.jit
    def f(cu, *xs):
        traces.append(1)
        return qdelta_rule(*xs[:6], cu_seqlens=cu)[0]

    a = f(jnp.array([0, 5, 20]), *inputs)
    b = f(jnp.array([0, 7, 20]), *inputs)
    assert len(traces) == 1
    assert float(jnp.abs(a - b).max()) > 0


def test_default_implementation_falls_back_for_sizes_the_kernels_do_not_take(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    from qdelta_jax.ops import default_implementation

    assert default_implementation(64, 128, 256) == "pallas"
    assert default_implementation(64, 512, 64) == "xla"  # K above the kernels' 256
    assert default_implementation(64, 64, 1024) == "xla"  # V above 512
    assert default_implementation(128, 64, 64) == "xla"  # chunk size


def test_cu_seqlens_as_a_python_list():
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.key(3), 1, 20, 1, 8, 8)
    # The list is a constant of the traced function, as a caller's list would be.
    o, _ = jax.jit(lambda *xs: qdelta_rule(*xs, cu_seqlens=[0, 7, 20], implementation="xla"))(
        q, k, v, g, beta, lam)
    o2, _ = jax.jit(lambda cu, *xs: qdelta_rule(*xs, cu_seqlens=cu, implementation="xla"))(
        jnp.array([0, 7, 20]), q, k, v, g, beta, lam)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o2))


def test_check_values_names_the_argument_and_the_first_bad_index():
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.key(4), 1, 12, 2, 8, 8)
    kw = dict(implementation="xla", check_values=True)
    o, _ = qdelta_rule(q, k, v, g.at[0, 3, 1].set(-jnp.inf), beta, lam, **kw)  # a reset is fine
    assert np.all(np.isfinite(np.asarray(o)))
    with pytest.raises(Exception, match=r"g must be <= 0 .*g\[0, 5, 1\] = 0\.5"):
        jax.block_until_ready(qdelta_rule(q, k, v, g.at[0, 5, 1].set(0.5), beta, lam, **kw))
    with pytest.raises(Exception, match=r"v must be finite: v\[0, 2, 0, 3\] = nan"):
        f = jax.jit(lambda v: qdelta_rule(q, k, v, g, beta, lam, **kw)[0])
        jax.block_until_ready(f(v.at[0, 2, 0, 3].set(jnp.nan)))
