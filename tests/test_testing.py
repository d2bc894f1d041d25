"""qdelta_jax.testing (inputs, offsets, shapes, errors, the timer), and the Nsight Compute summary
script the benchmarks use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdelta_jax.testing import (
    parse_shape,
    random_inputs,
    random_offsets,
    rel_err,
    time_fn,
)


def test_rel_err_is_inf_for_any_non_finite_value_and_never_nan():
    a = np.array([1.0, 2.0, 3.0])
    assert rel_err(a, a) == 0.0
    assert rel_err(a + np.array([0.0, 0.0, 1e-3]), a) == pytest.approx(1e-3 / np.sqrt(14))
    for bad in (np.nan, np.inf, -np.inf):
        worse = a.copy()
        worse[1] = bad
        assert rel_err(worse, a) == float("inf")  # in the result
        assert rel_err(a, worse) == float("inf")  # in the reference
        assert rel_err(worse, worse) == float("inf")  # in both, at the same place
    # The reason: a NaN error would vanish from a maximum and pass `not err > tol` checks.
    errs = [rel_err(a, a), rel_err(np.array([1.0, np.nan, 3.0]), a)]
    assert max(errs) == float("inf") and not max(errs) < 1.0
    nan16 = jnp.array([1.0, jnp.nan], jnp.bfloat16)
    assert rel_err(nan16, jnp.ones(2, jnp.bfloat16)) == float("inf")


def test_rel_err_norms_zero_reference_and_shapes():
    a, b = np.array([3.0, 0.0]), np.array([1.0, 1.0])
    assert rel_err(a, b) == pytest.approx(np.sqrt(5) / np.sqrt(2))
    assert rel_err(a, b, ord=np.inf) == pytest.approx(2.0)  # the largest entry
    assert rel_err(np.array([3.0, 4.0]), np.zeros(2)) == pytest.approx(5.0)  # |a - b| at b = 0
    # bfloat16 is read exactly (through float64, not rounded again)
    x = jnp.array([1.0, 1.0078125], jnp.bfloat16)
    assert rel_err(x, np.array([1.0, 1.0])) == pytest.approx(0.0078125 / np.sqrt(2))
    with pytest.raises(ValueError, match=r"one shape, got \(2,\) and \(1, 2\)"):
        rel_err(a, b[None])


def test_parse_shape_takes_five_positive_ints_and_names_what_it_got():
    assert parse_shape("8x4096x6x128x256") == (8, 4096, 6, 128, 256)
    assert parse_shape(" 1X2x3x4x5 ") == (1, 2, 3, 4, 5)
    for bad in ("8x4096x6x128", "8x4096x6x128x0", "8x-1x6x128x256", "axbxcxdxe", ""):
        with pytest.raises(ValueError, match=f"BxTxHxKxV.*got {bad!r}"):
            parse_shape(bad)


def test_random_offsets_rows_and_aligned_boundary():
    cu = random_offsets(3, 100, 5, seed=1)
    assert cu.shape == (3, 6) and cu.dtype == np.int32
    assert np.all(cu[:, 0] == 0) and np.all(cu[:, -1] == 100) and np.all(np.diff(cu, axis=1) > 0)
    cu = random_offsets(4, 200, 6, seed=2, aligned_to=64)
    for row in cu:
        inner = row[1:-1]
        assert np.all(np.diff(row) > 0) and np.any(inner % 64 == 0), row
    cu = random_offsets(1, 3, 5)  # more documents than tokens: the last ones are empty
    assert cu.tolist() == [[0, 1, 2, 3, 3, 3]]
    with pytest.raises(ValueError, match="S >= 1"):
        random_offsets(1, 10, 0)


def test_random_inputs_ranges_and_options():
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(0), 2, 9, 3, 4, 5, N=4)
    assert q.shape == k.shape == (2, 9, 3, 4) and v.shape == (2, 9, 3, 5)
    assert g.shape == beta.shape == lam.shape == (2, 9, 3) and h0.shape == (4, 3, 4, 5)
    assert float(jnp.max(g)) <= 0 and 0 < float(jnp.min(beta)) and float(jnp.max(lam)) < 1
    same = random_inputs(jax.random.key(0), 2, 9, 3, 4, 5, N=4)
    assert all(np.array_equal(a, b) for a, b in zip((q, k, v, g, beta, lam, h0), same))
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(0), 2, 9, 3, 4, 5, dtype=jnp.bfloat16,
                                              unit_qk=True, key_shift=0.5, g_rate=(0.0, 2.7),
                                              lam_zero=True, h0_scale=0.1)
    assert q.dtype == v.dtype == jnp.bfloat16 and g.dtype == h0.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(k, np.float32), axis=-1), 1.0, rtol=1e-2)
    assert float(jnp.max(jnp.abs(lam))) == 0.0 and float(jnp.max(g)) < 0
    zero = random_inputs(jax.random.key(0), 1, 4, 1, 2, 2, g_scale=0.0)[3]
    assert float(jnp.max(jnp.abs(zero))) == 0.0


def test_time_fn_rejects_nonsense_and_takes_a_sync():
    with pytest.raises(ValueError, match="reps >= 1"):
        time_fn(lambda: None, reps=0)
    syncs = []
    t = time_fn(lambda: 1, (), warmup=1, reps=2, pipelined=True, rounds=3, sync=syncs.append)
    assert t >= 0.0 and syncs == [1, [1, 1], [1, 1], [1, 1]]


def test_time_fn_counts_its_calls():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    t = time_fn(fn, (jnp.ones(3),), warmup=2, reps=4)
    assert len(calls) == 2 + 4 and t >= 0.0
    calls.clear()
    t = time_fn(fn, (jnp.ones(3),), warmup=1, reps=3, pipelined=True)
    assert len(calls) == 1 + 5 * 3 and t >= 0.0  # 5 rounds of reps back-to-back calls


def test_ncu_summary_makes_one_row_per_kernel(tmp_path, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "ncu_summary.py"
    spec = importlib.util.spec_from_file_location("ncu_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    head = ('"ID","Kernel Name","Grid Size","Block Size","Section Name","Metric Name",'
            '"Metric Unit","Metric Value"')
    rows = [
        '"0","qdelta_state_pass","(8, 6, 4)","(128, 1, 1)","SOL","Duration","ns","254,080"',
        '"0","qdelta_state_pass","(8, 6, 4)","(128, 1, 1)","Occ","Registers Per Thread","","255"',
        '"0","qdelta_state_pass","(8, 6, 4)","(128, 1, 1)","Cmd",'
        '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","","0.9"',
        '"0","qdelta_state_pass","(8, 6, 4)","(128, 1, 1)","Cmd",'
        '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","","1.9"',
        '"1","qdelta_chunk_output","(512, 6, 1)","(128, 1, 1)","SOL","Duration","ns","157,664"',
    ]
    f = tmp_path / "ncu.csv"
    f.write_text("==PROF== Connected\n" + "\n".join([head, *rows]) + "\nprogram output\n")
    mod.summarize(str(f))
    out = capsys.readouterr().out.splitlines()
    state = next(x for x in out if "qdelta_state_pass" in x)
    assert "254,080 ns" in state and "| 255 |" in state
    assert state.index("long_scoreboard 1.9") < state.index("barrier 0.9")
    assert any("qdelta_chunk_output" in x and "157,664 ns" in x for x in out)
