"""The lax.scan reference: the shared op suite (:mod:`op_suite`) against the reference run in
float64, and float64 NumPy loops written here from docs/MATH.md section 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from op_suite import CASES, OpSuite

from qdelta_jax import qdelta_rule, qdelta_step
from qdelta_jax.testing import random_inputs


def numpy_qdelta(q, k, v, g, beta, lam, h0, scale, normalize=True):
    """docs/MATH.md section 1 in float64 numpy, one token at a time, no code shared with the
    package."""
    q, k, v, g, beta, lam, h0 = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, lam, h0))
    B, T, H, K = q.shape
    if normalize:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    o = np.zeros(v.shape)
    S = h0.copy()
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                x = k[b, t, h] + lam[b, t, h] * q[b, t, h]
                s = np.exp(g[b, t, h]) * s
                e = v[b, t, h] - s.T @ x
                s = s + beta[b, t, h] * np.outer(k[b, t, h], e)
                o[b, t, h] = scale * s.T @ q[b, t, h]
            S[b, h] = s
    return o, S


# Sizes that matter to a scan: one token, K and V not powers of two, a long sequence, bfloat16.
REFERENCE_CASES = ("T1-C16", "T65-C32-K24-V40", "T200-C64-K20-V36", "bf16-T200-C32-V48")


class TestReference(OpSuite):
    implementation = "reference"
    oracle_x64 = True  # itself in float64: what float32 rounding costs the scan
    test_chunk_sizes_agree = None  # the scan has no chunks,
    test_many_chunks_forward = None  # nor chunk boundaries

    @pytest.mark.parametrize("case", [c for c in CASES if c.id in REFERENCE_CASES])
    def test_matches_reference(self, case):
        super().test_matches_reference(case)


@pytest.mark.parametrize("T,K,V", [(1, 8, 8), (37, 16, 24), (80, 12, 20)])
def test_reference_matches_float64_loop(T, K, V):
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(T + K), 2, T, 3, K, V)
    o, final = qdelta_rule(
        q, k, v, g, beta, lam, initial_state=h0, output_final_state=True,
        implementation="reference",
    )
    o_np, f_np = numpy_qdelta(q, k, v, g, beta, lam, h0, K**-0.5)
    np.testing.assert_allclose(o, o_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, f_np, rtol=1e-5, atol=1e-5)


def test_lam_changes_the_function():
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(3), 1, 40, 2, 16, 16)
    o1, _ = qdelta_rule(q, k, v, g, beta, lam, implementation="reference")
    o0, _ = qdelta_rule(q, k, v, g, beta, jnp.zeros_like(lam), implementation="reference")
    assert float(jnp.abs(o1 - o0).max()) > 1e-2


def test_step_is_one_token_of_the_scan():
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(11), 3, 1, 2, 8, 12)
    o, final = qdelta_rule(
        q, k, v, g, beta, lam, initial_state=h0, output_final_state=True,
        implementation="reference", normalize_qk=False,
    )
    o1, s = qdelta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lam[:, 0], scale=8**-0.5,
                        state=h0)
    np.testing.assert_allclose(o[:, 0], o1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final, s, rtol=1e-6, atol=1e-6)


def test_contraction_of_the_error_at_no_decay():
    """Lemma 3.1: with a = 1 the prediction error after the write is (1 - beta c) times before."""
    q, k, v, _, beta, lam, h0 = random_inputs(jax.random.key(5), 1, 1, 1, 16, 8)
    from qdelta_jax import l2_normalize

    qn, kn = l2_normalize(q)[0, 0, 0], l2_normalize(k)[0, 0, 0]
    x = kn + lam[0, 0, 0] * qn
    s0 = h0[0, 0]
    _, s1 = qdelta_step(qn, kn, v[0, 0, 0], jnp.zeros(()), beta[0, 0, 0], lam[0, 0, 0], scale=1.0,
                        state=s0)
    e_before = v[0, 0, 0] - s0.T @ x
    e_after = v[0, 0, 0] - s1.T @ x
    c = kn @ x
    np.testing.assert_allclose(e_after, (1 - beta[0, 0, 0] * c) * e_before, rtol=1e-4, atol=1e-5)
