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


def test_one_row_and_document_starts():
    cu = jnp.array([[0, 2, 5], [0, 5, 5]], jnp.int32)
    assert packing.one_row(cu, 5).tolist() == [0, 2, 5, 10, 10]  # 4 documents, the last empty
    assert packing.documents(cu, 2, 5).starts.tolist() == [[0, 0, 2, 2, 2], [0, 0, 0, 0, 0]]


def _documents_by_loop(cu, T):
    """ids, starts, ends [B, T] by walking the offsets (the last document past a row's end)."""
    cu = np.asarray(cu).reshape(-1, np.shape(cu)[-1])
    B, S = cu.shape[0], cu.shape[1] - 1
    ids = np.zeros((B, T), np.int64)
    for b in range(B):
        for t in range(T):
            ids[b, t] = max(s for s in range(S) if cu[b, s] <= t or s == 0)
    return ids, np.take_along_axis(cu, ids, 1), np.take_along_axis(cu, ids + 1, 1)


# Empty documents at the start, middle and end of rows, one ending on a chunk boundary (16).
CU_DOCS = [[0, 1, 1, 16, 20, 20], [0, 0, 7, 9, 20, 20]]


@pytest.mark.parametrize("cu", [CU_DOCS, [0, 3, 3, 20]], ids=["per-row", "one-row"])
def test_documents_derive_ids_starts_ends(cu):
    docs = packing.documents(jnp.asarray(cu, jnp.int32), B=len(cu) if np.ndim(cu) == 2 else 1,
                             T=20)
    ids, starts, ends = _documents_by_loop(cu, 20)
    assert docs.offsets.shape == (ids.shape[0], np.shape(cu)[-1])
    assert docs.num_states == ids.shape[0] * (np.shape(cu)[-1] - 1)
    for name, want in (("ids", ids), ("starts", starts), ("ends", ends)):
        got = getattr(docs, name)
        assert got.dtype == jnp.int32 and np.asarray(got).tolist() == want.tolist(), name


def test_documents_pass_through_once_made_and_name_a_shape_mismatch():
    docs = packing.documents(jnp.asarray(CU_DOCS, jnp.int32), 2, 20)
    assert packing.documents(docs, 2, 20) is docs
    with pytest.raises(ValueError, match=r"cu_seqlens \(packing.Documents\) describes 2 rows "
                                         r"of 20 tokens; the inputs have B = 2, T = 21"):
        packing.documents(docs, 2, 21)
    with pytest.raises(ValueError, match="cu_seqlens must end at the sequence length T = 21"):
        packing.documents(jnp.asarray(CU_DOCS, jnp.int32), 2, 21)


def test_layouts_from_documents_equal_layouts_from_offsets():
    cu = jnp.asarray(CU_DOCS, jnp.int32)
    docs = packing.documents(cu, 2, 20)
    for a, b in zip(packing.make_layout(2, 20, 8, cu, per_document=False),
                    packing.make_layout(2, 20, 8, docs, per_document=False), strict=True):
        assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b))
    with pytest.raises(ValueError, match="per-document layout takes one row"):
        packing.make_layout(2, 20, 8, docs, per_document=True)


def test_reference_per_row_documents_equal_one_packed_row():
    """The reference scans per-row documents row by row; laid end to end in one row (document
    s of row b becomes document b S + s) they compute the same outputs and final states."""
    from qdelta_jax.reference import qdelta_scan

    B, T, H, K, V = 2, 20, 2, 4, 6
    cu = jnp.asarray(CU_DOCS, jnp.int32)
    N = packing.num_states(cu)
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(13), B, T, H, K, V, N=N)
    o, fin = qdelta_scan(q, k, v, g, beta, lam, scale=0.5, initial_state=h0, cu_seqlens=cu)
    flat = [x.reshape((1, B * T) + x.shape[2:]) for x in (q, k, v, g, beta, lam)]
    o1, fin1 = qdelta_scan(*flat, scale=0.5, initial_state=h0,
                           cu_seqlens=packing.one_row(cu, T))
    tol = tolerance(F32)
    assert rel_err(o, o1.reshape(o.shape)) < tol and rel_err(fin, fin1) < tol
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        qdelta_scan(q, k, v, g, beta, lam, scale=0.5, cu_seqlens=cu + 1)


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
