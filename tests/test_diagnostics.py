"""Tests of the stability diagnostic (``qdelta_jax.diagnostics``): beta * c, c = k . (k + lam q)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdelta_jax import diagnostics


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(rng, B=3, T=40, H=2, K=8, lo=0.0, hi=1.0):
    q = _unit(rng.normal(size=(B, T, H, K)))
    k = _unit(rng.normal(size=(B, T, H, K)))
    beta = rng.uniform(lo, hi, size=(B, T, H))
    lam = rng.uniform(lo, hi, size=(B, T, H))
    return beta, lam, q, k


def test_default_gates_never_leave_the_interval():
    # beta, lam in (0, 1), unit q, k: c in [1 - lam, 1 + lam], so beta * c in (0, 2).
    rng = np.random.default_rng(0)
    beta, lam, q, k = _inputs(rng, lo=1e-3, hi=1 - 1e-3)
    # The extremes of c: q = k (c = 1 + lam) and q = -k (c = 1 - lam) on some steps.
    q[0, :5] = k[0, :5]
    q[1, :5] = -k[1, :5]
    layers = [diagnostics.beta_c(beta, lam, q, k)]
    s = diagnostics.summary(layers)
    assert s["overall"]["outside"] == 0.0
    assert 0.0 < s["overall"]["min"] and s["overall"]["max"] < 2.0
    for head in s["layers"][0]["heads"]:
        assert head["outside"] == 0.0


def test_allow_neg_eigval_constructed_case_lands_outside():
    # allow_neg_eigval doubles beta and lam (both in (0, 2)). With q = k, lam = 1.8, beta = 1.9:
    # c = 2.8, beta * c = 5.32 >= 2. With q = -k, lam = 1.5: c = -0.5, beta * c < 0.
    B, T, H, K = 1, 10, 2, 4
    k = np.zeros((B, T, H, K))
    k[..., 0] = 1.0
    q = k.copy()
    q[0, 5:] = -k[0, 5:]
    beta = np.full((B, T, H), 0.5)
    lam = np.full((B, T, H), 0.2)
    beta[0, 0:2], lam[0, 0:2] = 1.9, 1.8  # above: 1.9 * 2.8
    beta[0, 5:8], lam[0, 5:8] = 1.0, 1.5  # below: 1.0 * (1 - 1.5)
    s = diagnostics.summary([diagnostics.beta_c(beta, lam, q, k)])
    o = s["overall"]
    assert o["above"] == pytest.approx(2 / 10)
    assert o["below"] == pytest.approx(3 / 10)
    assert o["outside"] == pytest.approx(5 / 10)
    assert o["max"] == pytest.approx(1.9 * 2.8, rel=1e-6)
    assert o["min"] == pytest.approx(-0.5, rel=1e-6)


def test_numbers_match_numpy():
    rng = np.random.default_rng(1)
    beta, lam, q, k = _inputs(rng, lo=0.0, hi=2.0)  # wide enough to leave (0, 2) at times
    mask = rng.random(beta.shape[:2]) > 0.3
    bc = diagnostics.beta_c(beta, lam, q, k)
    ref = beta * np.einsum("bthk,bthk->bth", k, k + lam[..., None] * q)
    np.testing.assert_allclose(np.asarray(bc), ref, rtol=1e-5, atol=1e-6)
    s = diagnostics.summary([bc, 2 * bc], mask=mask)
    for li, layer in enumerate([ref, 2 * ref]):
        for h in range(ref.shape[-1]):
            x = layer[..., h][mask]
            st = s["layers"][li]["heads"][h]
            assert st["n"] == x.size
            assert st["min"] == pytest.approx(x.min(), rel=1e-5)
            assert st["max"] == pytest.approx(x.max(), rel=1e-5)
            assert st["mean"] == pytest.approx(x.mean(), rel=1e-5)
            for p in diagnostics.QUANTILES:
                assert st[f"q{100 * p:g}"] == pytest.approx(np.quantile(x, p), rel=1e-4, abs=1e-6)
            assert st["outside"] == pytest.approx(np.mean((x <= 0) | (x >= 2)), abs=1e-12)
    pooled = np.concatenate([ref[mask].ravel(), 2 * ref[mask].ravel()])
    assert s["overall"]["outside"] == pytest.approx(np.mean((pooled <= 0) | (pooled >= 2)))


def test_table_and_compact():
    rng = np.random.default_rng(2)
    s = diagnostics.summary([diagnostics.beta_c(*_inputs(rng))])
    text = diagnostics.format_table(s)
    assert "outside %" in text and len(text.splitlines()) == 1 + 2 + 1 + 1  # head, 2 heads, all
    md = diagnostics.format_table(s, markdown=True)
    assert md.startswith("| layer |") and "| --- |" in md
    c = diagnostics.compact(s)
    assert set(c) >= {"min", "q50", "max", "outside", "outside_by_layer"}
    with pytest.raises(ValueError, match="does not broadcast"):
        diagnostics.summary([np.zeros((2, 3, 2))], mask=np.ones((4,), bool))


@pytest.mark.parametrize("neg", [False, True])
def test_model_summary(neg):
    from flax import nnx

    from qdelta_jax.model import QDeltaConfig, QDeltaLM

    cfg = QDeltaConfig.from_preset("tiny", vocab_size=64, allow_neg_eigval=neg,
                                   implementation="reference")
    model = QDeltaLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 64)
    s = diagnostics.summary(model, tokens)
    assert len(s["layers"]) == cfg.num_hidden_layers
    assert len(s["layers"][0]["heads"]) == cfg.num_heads
    assert s["overall"]["n"] == 2 * 24 * cfg.num_heads * cfg.num_hidden_layers
    # The aux path gives the same numbers.
    _, aux = model(tokens, return_aux=True)
    s2 = diagnostics.summary(aux)
    assert s2["overall"]["mean"] == pytest.approx(s["overall"]["mean"])
    if not neg:
        assert s["overall"]["outside"] == 0.0
    with pytest.raises(ValueError, match="tokens"):
        diagnostics.summary(model)


def test_summary_from_params_and_cli_flag():
    from flax import nnx

    from qdelta_jax.model import QDeltaConfig, QDeltaLM
    from qdelta_jax.train import cli, loop

    cfg = QDeltaConfig.from_preset("tiny", vocab_size=64, implementation="reference",
                                   num_hidden_layers=1)
    fns = loop.ModelFns(lambda: QDeltaLM(cfg, rngs=nnx.Rngs(0)))
    params = fns.init()
    batch = {"inputs": np.asarray(jax.random.randint(jax.random.key(1), (2, 16), 0, 64))}
    s = diagnostics.summary_from_params(fns, params, batch)
    direct = diagnostics.summary(QDeltaLM(cfg, rngs=nnx.Rngs(0)), jnp.asarray(batch["inputs"]))
    assert s["overall"]["mean"] == pytest.approx(direct["overall"]["mean"], rel=1e-5)
    summary_of = diagnostics.params_summary_fn(fns)  # one compiled function, reused
    for seed in (1, 2):
        batch = {"inputs": np.asarray(jax.random.randint(jax.random.key(seed), (2, 16), 0, 64))}
        direct = diagnostics.summary(QDeltaLM(cfg, rngs=nnx.Rngs(0)), jnp.asarray(batch["inputs"]))
        got = summary_of(params, batch)["overall"]["mean"]
        assert got == pytest.approx(direct["overall"]["mean"], rel=1e-5)
    assert cli.parse_args(["--diagnostics"]).diagnostics is True
    assert cli.parse_args([]).diagnostics is False
