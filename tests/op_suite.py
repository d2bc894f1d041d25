"""The cases every implementation of ``qdelta_rule`` must pass, in one place.

Each implementation's test module subclasses :class:`OpSuite` and names its implementation::

    class TestXla(OpSuite):
        implementation = "xla"

and adds the tests only that implementation needs. Every case compares the implementation with
the reference scan (``implementation="reference"``, the definition) on fresh random inputs:
the output, the final state and the gradients of all seven inputs, float32 and bfloat16, with
tolerances from :func:`qdelta_jax.testing.tolerance`. The reference itself is compared with the
reference run in float64 (its own float32 rounding), and with float64 NumPy loops in
``test_reference.py``.

A subclass drops a case its implementation cannot take by setting it to ``None`` (with the
reason beside it), and may narrow ``chunk_sizes``.

Shapes are small and few: the Pallas kernels run in interpret mode on the CPU, and the oracle's
results are computed once per case and shared by every implementation in the session.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from qdelta_jax import qdelta_rule
from qdelta_jax.testing import random_inputs, rel_err, tolerance

F32, BF16 = jnp.float32, jnp.bfloat16
ARGS = ("q", "k", "v", "g", "beta", "lam", "h0")

# (B, T, H, K, V, chunk, dtype): one token, T one short of, equal to and one past a chunk, K and
# V not powers of two (the kernels pad them), one head, several chunks, bfloat16.
CASES = [
    pytest.param((2, 1, 2, 8, 8, 16, F32), id="T1-C16"),
    pytest.param((2, 63, 2, 32, 24, 64, F32), id="T63-C64-V24"),
    pytest.param((1, 64, 1, 16, 40, 64, F32), id="T64-C64-H1-V40"),
    pytest.param((2, 65, 2, 24, 40, 32, F32), id="T65-C32-K24-V40"),
    pytest.param((2, 200, 2, 20, 36, 64, F32), id="T200-C64-K20-V36"),
    pytest.param((2, 200, 2, 32, 48, 32, BF16), id="bf16-T200-C32-V48"),
]

# Packed documents of one row: an empty one (10, 10) and a one-token one (80, 81).
CU_DOCS = (0, 10, 10, 80, 81, 150)
# Per-row documents: row 0 a one-token document, an empty one and one ending on a chunk
# boundary; row 1 more documents than chunks. No state in or out (the row-aligned layout, so
# every kernel sees boundaries inside chunks).
CU_ROWS = ((0, 1, 1, 16, 29, 40), (0, 3, 6, 10, 13, 40))


def _seed(*parts) -> int:
    """A seed that names the case (``hash`` of a string changes from one process to the next)."""
    return zlib.crc32(repr(parts).encode())


@functools.cache
def _value_and_grads(impl: str, chunk_size: int, with_state: bool):
    """Jitted ``(o, final, grads)`` of a loss that mixes every output element (and, with a
    state, the final state) through fixed random weights; ``cu`` is traced."""

    def loss(args, cu, w_o, w_f):
        if with_state:
            *xs, h0 = args
        else:
            xs, h0 = args, None
        o, fin = qdelta_rule(*xs, initial_state=h0, output_final_state=with_state,
                             chunk_size=chunk_size, cu_seqlens=cu, implementation=impl)
        total = jnp.sum(o.astype(w_o.dtype) * w_o)
        if with_state:
            total = total + jnp.sum(fin.astype(w_f.dtype) * w_f)
        return total, (o, fin)

    def run(args, cu, w_o, w_f):
        (_, (o, fin)), grads = jax.value_and_grad(loss, has_aux=True)(args, cu, w_o, w_f)
        return o, fin, grads

    return jax.jit(run)


@functools.cache
def _forward(impl: str, chunk_size: int):
    def run(args, cu):
        *xs, h0 = args
        return qdelta_rule(*xs, initial_state=h0, output_final_state=True,
                           chunk_size=chunk_size, cu_seqlens=cu, implementation=impl)

    return jax.jit(run)


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _weights(inputs, seed):
    v, h0 = inputs[2], inputs[-1]
    kw = jax.random.split(jax.random.key(seed + 1))
    return (jax.random.normal(kw[0], v.shape, jnp.float32),
            jax.random.normal(kw[1], (0,) if h0 is None else h0.shape, jnp.float32))


@functools.cache
def _reference_result(key, x64: bool, grads: bool = True):
    """The reference's ``(o, final, grads)`` (``grads=False``: ``(o, final)``) for a case built
    by :func:`_case_inputs`, computed once per session: every implementation's subclass compares
    with the same numbers."""
    kind, spec = key
    inputs, cu = _case_inputs(kind, spec)
    w_o, w_f = _weights(inputs, _seed(kind, spec))
    with_state = inputs[-1] is not None
    args = inputs if with_state else inputs[:6]

    def run(args, w_o, w_f):
        if grads:
            return _value_and_grads("reference", 64, with_state)(args, cu, w_o, w_f)
        return _forward("reference", 64)(args, cu)

    if not x64:
        return _to_numpy(run(args, w_o, w_f))
    with jax.enable_x64(True):
        up = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
        return _to_numpy(run(tuple(up(x) for x in args), up(w_o), up(w_f)))


@functools.cache
def _document_reference(n: int):
    """The reference's ``(o, final)`` of packed document ``n`` of :data:`CU_DOCS` run alone."""
    (*xs, h0), _ = _case_inputs("docs", ())
    s, e = CU_DOCS[n], CU_DOCS[n + 1]
    return _to_numpy(_forward("reference", 64)((*(x[:, s:e] for x in xs), h0[n:n + 1]), None))


def _case_inputs(kind: str, spec: tuple):
    """``(inputs, cu_seqlens)`` of a named case, fresh random but the same for every caller."""
    seed = _seed(kind, spec)
    key = jax.random.key(seed)
    if kind == "shape":
        B, T, H, K, V, dtype = spec
        return random_inputs(key, B, T, H, K, V, dtype=jnp.dtype(dtype)), None
    if kind == "gate":
        (g_scale,) = spec
        return random_inputs(key, 1, 130, 2, 16, 16, g_scale=g_scale), None
    if kind == "reset":  # g = -inf (and -1e30) at a few tokens: the state is zeroed exactly
        q, k, v, g, beta, lam, h0 = random_inputs(key, 1, 40, 2, 16, 16)
        g = g.at[0, 5, 0].set(-jnp.inf).at[0, 20, :].set(-jnp.inf).at[0, 33, 1].set(-1e30)
        return (q, k, v, g, beta, lam, h0), None
    if kind == "docs":
        T, N = CU_DOCS[-1], len(CU_DOCS) - 1
        q, k, v, g, beta, lam, _ = random_inputs(key, 1, T, 2, 16, 12)
        h0 = jax.random.normal(jax.random.fold_in(key, 1), (N, 2, 16, 12))
        return (q, k, v, g, beta, lam, h0), jnp.asarray(CU_DOCS, jnp.int32)
    if kind == "rows":
        (dtype,) = spec
        inputs = random_inputs(key, 2, 40, 2, 16, 24, dtype=jnp.dtype(dtype))
        return (*inputs[:6], None), jnp.asarray(CU_ROWS, jnp.int32)
    raise ValueError(f"unknown case kind {kind!r}")


def numpy_gated_delta(q, k, v, g, beta, h0, scale):
    """Gated DeltaNet in float64 NumPy, written from its own definition (not from Q-Delta's):
    ``S = a (I - beta k k^T) S + beta k v^T``, ``o = scale S^T q``, q and k L2-normalised."""
    q, k, v, g, beta, h0 = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, h0))
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    B, T, H, K = q.shape
    o = np.zeros(v.shape)
    S = h0.copy()
    eye = np.eye(K)
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                kt = k[b, t, h]
                s = np.exp(g[b, t, h]) * (eye - beta[b, t, h] * np.outer(kt, kt)) @ s
                s = s + beta[b, t, h] * np.outer(kt, v[b, t, h])
                o[b, t, h] = scale * s.T @ q[b, t, h]
            S[b, h] = s
    return o, S


class OpSuite:
    """The shared cases; a subclass sets ``implementation`` (and may narrow ``chunk_sizes``)."""

    implementation: str
    chunk_sizes: tuple[int, ...] = (16, 32, 64, 128)
    #: compare with the reference in float64 instead of float32 (the reference's own suite)
    oracle_x64: bool = False

    # ------------------------------------------------------------------------- helpers

    def run(self, kind: str, spec: tuple, chunk_size: int):
        inputs, cu = _case_inputs(kind, spec)
        w_o, w_f = _weights(inputs, _seed(kind, spec))
        with_state = inputs[-1] is not None
        args = inputs if with_state else inputs[:6]
        out = _value_and_grads(self.implementation, chunk_size, with_state)(args, cu, w_o, w_f)
        return args, out

    def expected(self, kind: str, spec: tuple, grads: bool = True):
        return _reference_result((kind, spec), self.oracle_x64, grads)

    def assert_matches(self, kind, spec, chunk_size, tol, grad_tol=None):
        """Output, final state and every gradient within ``tol`` (gradients ``grad_tol``) of
        the oracle; dtypes as the op promises: ``o`` and each gradient in its input's dtype,
        the final state float32."""
        args, (o, fin, grads) = self.run(kind, spec, chunk_size)
        o_r, fin_r, grads_r = self.expected(kind, spec)
        grad_tol = tol if grad_tol is None else grad_tol
        assert o.dtype == args[2].dtype and o.shape == o_r.shape
        errs = {"o": rel_err(o, o_r)}
        if fin is not None:
            assert fin.dtype == F32
            errs["final"] = rel_err(fin, fin_r)
        for name, x, a, b in zip(ARGS, args, grads, grads_r):
            assert a.dtype == x.dtype and a.shape == x.shape, name
            errs["d" + name] = rel_err(a, b)
        bad = {n: e for n, e in errs.items() if not e < (tol if n in ("o", "final") else grad_tol)}
        assert not bad, f"{self.implementation}: above {tol} / {grad_tol}: {bad} (all: {errs})"
        return args, (o, fin, grads)

    # ------------------------------------------------------------------------- cases

    @pytest.mark.parametrize("case", CASES)
    def test_matches_reference(self, case):
        *shape, C, dtype = case
        self.assert_matches("shape", (*shape, jnp.dtype(dtype).name), C, tolerance(dtype))

    def test_many_chunks_forward(self):
        """Sixteen chunks: the state passes through many chunk boundaries (forward only)."""
        spec = (2, 1000, 2, 16, 16, "float32")
        o_r, fin_r = self.expected("shape", spec, grads=False)
        o, fin = _forward(self.implementation, 64)(_case_inputs("shape", spec)[0], None)
        assert rel_err(o, o_r) < tolerance(F32)
        assert rel_err(fin, fin_r) < tolerance(F32)

    def test_chunk_sizes_agree(self):
        spec = (1, 150, 2, 16, 24, "float32")
        o_r, fin_r = self.expected("shape", spec, grads=False)
        inputs, _ = _case_inputs("shape", spec)
        for C in self.chunk_sizes:
            o, fin = _forward(self.implementation, C)(inputs, None)
            assert rel_err(o, o_r) < tolerance(F32), C
            assert rel_err(fin, fin_r) < tolerance(F32), C

    @pytest.mark.parametrize("g_scale", [0.0, 40.0], ids=["g=0", "g-very-negative"])
    def test_gate_extremes(self, g_scale):
        """No decay (g = 0) and very negative g (exp(G) underflows inside a chunk) stay exact;
        the gradients pass one more chain of decays: 4 units."""
        C = 32
        (q, k, v, g, *_), _ = _case_inputs("gate", (g_scale,))
        if g_scale:
            assert float(jnp.min(g)) < -5.0
            assert float(jnp.sum(g[0, :C, 0])) < -200.0  # far below exp underflow
        else:
            assert float(jnp.max(jnp.abs(g))) == 0.0
        self.assert_matches("gate", (g_scale,), C, tolerance(F32), 4 * tolerance(F32))

    def test_minus_infinity_decay_is_a_reset(self):
        """g = -inf zeroes the state exactly (as the recurrence does): the result stays finite
        and equals the reference, forward and gradients."""
        self.assert_matches("reset", (), 16, tolerance(F32), 2 * tolerance(F32))

    def test_packed_documents(self):
        """Packed documents (an empty and a one-token one among them) equal one run per
        document from that document's initial state; an empty document's final state is its
        initial state, exactly; gradients equal the reference's."""
        C = 16
        (*xs, h0), (o, fin, _) = self.assert_matches("docs", (), C, tolerance(F32))
        for n in range(len(CU_DOCS) - 1):
            s, e = CU_DOCS[n], CU_DOCS[n + 1]
            if e == s:
                np.testing.assert_array_equal(np.asarray(fin[n]), np.asarray(h0[n]))
                continue
            o_n, f_n = _document_reference(n)
            assert rel_err(o[:, s:e], o_n) < tolerance(F32), n
            assert rel_err(fin[n:n + 1], f_n) < tolerance(F32), n

    @pytest.mark.parametrize("dtype,C", [(F32, 16), (BF16, 32)], ids=["f32-C16", "bf16-C32"])
    def test_packed_rows(self, dtype, C):
        self.assert_matches("rows", (jnp.dtype(dtype).name,), C, tolerance(dtype))

    def test_state_chaining(self):
        """Two calls, the second starting from the first's final state, equal one call: the
        cut falls inside a chunk."""
        C, cut = 64, 70
        q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(3), 2, 2 * cut, 2, 16, 16)
        run = _forward(self.implementation, C)
        o, f = run((q, k, v, g, beta, lam, h0), None)
        first = [x[:, :cut] for x in (q, k, v, g, beta, lam)]
        second = [x[:, cut:] for x in (q, k, v, g, beta, lam)]
        o1, f1 = run((*first, h0), None)
        o2, f2 = run((*second, f1), None)
        assert rel_err(jnp.concatenate([o1, o2], 1), o) < tolerance(F32)
        assert rel_err(f2, f) < tolerance(F32)

    @pytest.mark.parametrize("use_decay", [True, False], ids=["gated-deltanet", "deltanet"])
    def test_lam_zero_is_gated_delta_rule(self, use_decay):
        """lam = 0 is the gated delta rule; lam = 0 and g = 0 is DeltaNet (float64 loops)."""
        q, k, v, g, beta, lam, h0 = random_inputs(
            jax.random.key(7), 1, 50, 2, 16, 16, lam_zero=True, g_scale=1.0 if use_decay else 0.0)
        assert not use_decay or float(jnp.min(g)) < 0
        o_ref, f_ref = numpy_gated_delta(q, k, v, g, beta, h0, 0.3)
        o, final = qdelta_rule(q, k, v, g, beta, lam, scale=0.3, initial_state=h0,
                               output_final_state=True, implementation=self.implementation,
                               chunk_size=16)
        np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(final, f_ref, rtol=1e-5, atol=1e-5)

    def test_check_grads_float64(self):
        """Reverse-mode gradients against finite differences, in float64."""
        with jax.enable_x64(True):
            inputs = random_inputs(jax.random.key(8), 1, 11, 2, 4, 3, dtype=jnp.float64)
            inputs = tuple(x.astype(jnp.float64) for x in inputs)

            def f(q, k, v, g, beta, lam, h0):
                return qdelta_rule(q, k, v, g, beta, lam, initial_state=h0,
                                   output_final_state=True, chunk_size=4,
                                   implementation=self.implementation)

            jax.test_util.check_grads(f, inputs, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
