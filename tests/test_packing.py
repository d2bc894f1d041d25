"""Packed documents (qdelta_jax.packing): offsets, the two chunk layouts, the segmented chunk
cumsum, and the op on packed rows against the reference and against separate runs, forward and
every gradient. The Pallas kernels on packed rows are in test_pallas.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdelta_jax import packing, qdelta_rule
from qdelta_jax.testing import random_inputs, rel_err, tolerance

F32 = jnp.float32
ARGS = ("q", "k", "v", "g", "beta", "lam")


# ----------------------------------------------------------------------------- layouts


def test_row_aligned_layout_keeps_every_token_in_place():
    # Row 0: a one-token document, an empty one, a document ending exactly on a chunk boundary
    # (16), documents inside one chunk; row 1: more documents than chunks.
    cu = jnp.array([[0, 1, 1, 16, 20, 37, 40, 40], [0, 3, 6, 9, 12, 15, 30, 40]], jnp.int32)
    lay = packing.make_layout(2, 40, 16, cu, per_document=False)
    assert lay.Tp == 48 and lay.pos is None  # ceil(40 / 16) chunks, no scatter
    seg = np.asarray(lay.seg)
    assert seg.shape == (2, 48)
    assert seg[0, :1].tolist() == [0] and set(seg[0, 1:16]) == {2} and seg[0, 16] == 3
    assert seg[1, 14] == 4 and seg[1, 15] == 5 and (seg[:, 40:] == 6).all()
    # The carried state resets where a document starts exactly at a chunk: row 0 at chunk 1.
    assert np.asarray(lay.meta.reset).tolist() == [[True, True, False], [True, False, False]]
    assert not np.asarray(lay.meta.is_last).any()


def test_per_document_layout_pads_documents_to_chunks():
    cu = jnp.array([0, 1, 1, 16, 40], jnp.int32)
    lay = packing.make_layout(1, 40, 16, cu, per_document=True)
    # Sized statically for the worst case, (T + N (C - 1)) // C chunks; 4 are used here.
    assert lay.seg is None and lay.Tp == 16 * ((40 + 4 * 15) // 16)
    assert np.asarray(lay.pos)[[0, 1, 16, 39]].tolist() == [0, 16, 32, 55]
    assert np.asarray(lay.meta.reset)[0, :4].tolist() == [True, True, True, False]


def test_segmented_cumsum_restarts_at_documents_without_losing_precision():
    C, T = 16, 48
    rng = np.random.default_rng(0)
    g = -rng.uniform(0, 1, (2, T, 3)).astype(np.float32)
    g[0, :8] = -1e4  # a steep document before a slow one in the same chunk
    cu = jnp.array([[0, 8, 20, 21, 48], [0, 16, 16, 40, 48]], jnp.int32)
    seg = packing.doc_ids(cu, T)
    G = np.asarray(packing.chunk_cumsum(jnp.asarray(g), C, seg))
    want = np.zeros_like(g, np.float64)
    s = np.asarray(seg)
    for b in range(2):
        for t in range(T):
            new = t % C == 0 or s[b, t] != s[b, t - 1]
            want[b, t] = g[b, t] + (0.0 if new else want[b, t - 1])
    np.testing.assert_allclose(G, want, rtol=1e-6, atol=0)


def test_one_row_and_doc_starts():
    cu = jnp.array([[0, 2, 5], [0, 5, 5]], jnp.int32)
    assert packing.one_row(cu, 5).tolist() == [0, 2, 5, 10, 10]  # 4 documents, the last empty
    assert packing.doc_starts(cu, 5).tolist() == [[0, 0, 2, 2, 2], [0, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------- the op, packed


def _loss(impl, C, cu, states):
    def f(q, k, v, g, beta, lam, h0, w, wf):
        o, fin = qdelta_rule(q, k, v, g, beta, lam, cu_seqlens=cu, chunk_size=C,
                             initial_state=h0 if states else None,
                             output_final_state=states, implementation=impl)
        loss = jnp.sum(o.astype(F32) * w)
        if states:
            loss = loss + jnp.sum(fin * wf)
        return loss, (o, fin)

    n = 7 if states else 6
    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(n)), has_aux=True))


def _compare(cu, B, T, H, K, V, C, *, dtype=F32, states=False, g_scale=1.0, seed=0, impl="xla"):
    N = packing.num_states(cu)
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(seed), B, T, H, K, V, N=N,
                                              dtype=dtype, g_scale=g_scale)
    w = jax.random.normal(jax.random.key(seed + 1), (B, T, H, V), F32)
    wf = jax.random.normal(jax.random.key(seed + 2), (N, H, K, V), F32)
    args = (q, k, v, g, beta, lam, h0, w, wf)
    (_, (o, fin)), grads = _loss(impl, C, cu, states)(*args)
    ref_args = tuple(x.astype(F32) for x in args)
    (_, (o_r, fin_r)), grads_r = _loss("reference", C, cu, states)(*ref_args)
    tol = tolerance(dtype, T)
    errs = {"o": rel_err(o, o_r)}
    if states:
        errs["final"] = rel_err(fin, fin_r)
    for i, (name, a, b) in enumerate(zip(ARGS + ("h0",), grads, grads_r)):
        assert a.shape == b.shape and a.dtype == args[i].dtype, name
        errs["d" + name] = rel_err(a, b)
    # Gradients pass through one more chain of products than the output: 2x its tolerance.
    bad = {n: e for n, e in errs.items() if not e <= (tol if n in ("o", "final") else 2 * tol)}
    assert not bad, f"above {tol}: {bad} (all {errs})"


# Row 0: one-token documents, an empty one, a document ending exactly on a chunk boundary;
# row 1: more documents than chunks.
CU_ROWS = jnp.array([[0, 1, 2, 2, 32, 45, 70], [0, 3, 7, 12, 20, 21, 70]], jnp.int32)


@pytest.mark.parametrize("C", [16, 32, 64])
def test_row_aligned_packing_matches_reference(C):
    _compare(CU_ROWS, 2, 70, 2, 12, 20, C)


@pytest.mark.parametrize("g_scale", [0.0, 80.0])
def test_row_aligned_packing_gate_extremes(g_scale):
    _compare(CU_ROWS, 2, 70, 1, 8, 8, 16, g_scale=g_scale, seed=3)


def test_row_aligned_packing_bfloat16():
    _compare(CU_ROWS, 2, 70, 2, 16, 16, 32, dtype=jnp.bfloat16, seed=5)


def test_one_row_offsets_match_reference():
    cu = jnp.array([0, 5, 5, 16, 17, 50], jnp.int32)
    _compare(cu, 1, 50, 2, 8, 12, 16, seed=7)


@pytest.mark.parametrize("cu", [CU_ROWS, jnp.array([0, 5, 5, 16, 17, 70], jnp.int32)],
                         ids=["per-row", "one-row"])
def test_packed_documents_with_initial_and_final_states(cu):
    B = 1 if cu.ndim == 1 else 2
    _compare(cu, B, 70, 2, 8, 12, 16, states=True, seed=9)


def test_packed_rows_equal_separate_runs():
    """Each document of a packed row computes what it computes alone."""
    B, T, H, K, V = 2, 70, 2, 8, 8
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.key(11), B, T, H, K, V)
    o, _ = qdelta_rule(q, k, v, g, beta, lam, cu_seqlens=CU_ROWS, chunk_size=16,
                       implementation="xla")
    cu = np.asarray(CU_ROWS)
    for b in range(B):
        for s in range(cu.shape[1] - 1):
            lo, hi = cu[b, s], cu[b, s + 1]
            if hi == lo:
                continue
            parts = [x[b:b + 1, lo:hi] for x in (q, k, v, g, beta, lam)]
            o1, _ = qdelta_rule(*parts, chunk_size=16, implementation="xla")
            assert rel_err(o[b:b + 1, lo:hi], o1) < tolerance(F32), (b, s)
