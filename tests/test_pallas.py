"""The Pallas kernels (interpret mode on the CPU): ``qdelta_rule(..., implementation="pallas")``
runs the shared op suite (:mod:`op_suite`: forward and all gradients against the reference at
awkward sizes, packed documents and rows, gates at both extremes); here each kernel stage
against its :mod:`qdelta_jax.xla` oracle, the kernel config, and the choice between the Triton
and Mosaic kernels. Shapes are small: interpret mode is slow."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import op_suite
import pytest
from op_suite import OpSuite

from qdelta_jax import packing, qdelta_rule, xla
from qdelta_jax.pallas import backward as pbwd
from qdelta_jax.pallas import config as pcfg
from qdelta_jax.pallas import core as pcore
from qdelta_jax.pallas import forward as pfwd
from qdelta_jax.testing import random_inputs, rel_err

F32 = jnp.float32
TOL = {jnp.dtype(F32): 2e-5, jnp.dtype(jnp.bfloat16): 1e-2}
ARGS = ("q", "k", "v", "g", "beta", "lam", "h0")


class TestPallas(OpSuite):
    implementation = "pallas"
    chunk_sizes = (16, 32, 64)  # the kernels' largest chunk
    test_check_grads_float64 = None  # the kernels take float32 and bfloat16 only


def make(seed, B, T, H, K, V, N=None, dtype=F32):
    """Inputs for the kernels called directly (no normalisation in between): unit q and k, keys
    correlated as after a SiLU; and random output weights ``w``."""
    args = random_inputs(jax.random.PRNGKey(seed), B, T, H, K, V, N=N, dtype=dtype, unit_qk=True,
                         key_shift=0.3, lam_shift=0.0, g_scale=2.0, h0_scale=1.0)
    w = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 1), (B, T, H, V), F32)
    return args, w


def value_and_grads(impl, C, cu_seqlens=None, config=None):
    def loss(q, k, v, g, beta, lam, h0, w):
        o, fin = qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, output_final_state=True,
                             chunk_size=C, cu_seqlens=cu_seqlens, implementation=impl,
                             config=config)
        return jnp.sum(o.astype(F32) * w) + jnp.sum(fin * jnp.cos(h0)), (o, fin)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))


# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def staged():
    """Inputs on the padded layout and the xla.py stages, C = 32, float32."""
    C, B, T, H, K, V = 32, 2, 64, 2, 16, 32
    (q, k, v, g, beta, lam, h0), _ = make(1, B, T, H, K, V)
    meta = packing.make_layout(B, T, C, None).meta
    sp = lambda x: xla._split(x, C)  # noqa: E731
    G = packing.chunk_cumsum(g, C)
    assert rel_err(sp(G), jnp.cumsum(sp(g), axis=-1)) < 1e-6
    loc = xla.chunk_local(sp(q), sp(k), sp(v), sp(G), sp(beta), sp(lam))
    xh, xD, xf = xla.state_pass(sp(k), loc.G, loc.W, loc.U, h0, meta, F32)
    return dict(C=C, q=q, k=k, v=v, G=G, beta=beta, lam=lam, h0=h0, meta=meta, sp=sp, loc=loc,
                xh=xh, xD=xD, xf=xf, cfg=pcfg.default_config(K, V, C), scale=K**-0.5)


def test_forward_stages_match_xla(staged):
    s = staged
    C, cfg, sp, loc, m = s["C"], s["cfg"], s["sp"], s["loc"], s["meta"]
    W, U, _ = pfwd.chunk_local(s["q"], s["k"], s["v"], s["G"], s["beta"], s["lam"], C=C,
                               cfg=cfg.wu, interpret=True)
    assert rel_err(sp(W), loc.W) < 1e-5 and rel_err(sp(U), loc.U) < 1e-5
    # K slices in the solve, K and V tiles in W and U: the same numbers.
    W2, U2, _ = pfwd.chunk_local(s["q"], s["k"], s["v"], s["G"], s["beta"], s["lam"], C=C,
                                 cfg=pcfg.StageConfig(block_v=16, block_k=8), interpret=True,
                                 cfg_solve=pcfg.StageConfig(num_warps=1, block_k=8))
    assert rel_err(W2, W) < 1e-6 and rel_err(U2, U) < 1e-6
    h_in, D, fin = pfwd.state_pass(s["k"], s["G"], W, U, s["h0"], m.reset, m.is_last, m.seq, C=C,
                                   cfg=cfg.state, interpret=True)
    assert rel_err(jnp.moveaxis(h_in, 2, 1), s["xh"]) < 1e-5
    assert rel_err(sp(D), s["xD"]) < 1e-5
    assert rel_err(fin, s["xf"]) < 1e-5
    o = pfwd.chunk_output(s["q"], s["k"], s["G"], h_in, D, scale=s["scale"], out_dtype=F32, C=C,
                          cfg=cfg.output, interpret=True)
    xo = xla.chunk_output(sp(s["q"]), sp(s["k"]), loc.G, s["xh"], s["xD"], s["scale"], F32)
    assert rel_err(sp(o), xo) < 1e-5
    o2 = pfwd.chunk_output(s["q"], s["k"], s["G"], h_in, D, scale=s["scale"], out_dtype=F32, C=C,
                           cfg=pcfg.StageConfig(block_v=16, block_k=8), interpret=True)
    assert rel_err(sp(o2), xo) < 1e-5  # by K slices


def test_backward_stages_match_xla(staged):
    s = staged
    C, cfg, sp, loc, m, scale = s["C"], s["cfg"], s["sp"], s["loc"], s["meta"], s["scale"]
    q, k, v, G, beta, lam, h0 = (s[n] for n in ("q", "k", "v", "G", "beta", "lam", "h0"))
    do = jax.random.normal(jax.random.PRNGKey(11), v.shape, F32)
    dfin = jax.random.normal(jax.random.PRNGKey(12), h0.shape, F32)
    W, U, Tinv = pfwd.chunk_local(q, k, v, G, beta, lam, C=C, cfg=cfg.wu, interpret=True)
    assert rel_err(sp(Tinv), loc.Tinv) < 1e-5
    h_in, D, _ = pfwd.state_pass(k, G, W, U, h0, m.reset, m.is_last, m.seq, C=C, cfg=cfg.state,
                                 interpret=True)
    _, incl = xla._masks(C)
    P = xla._mm("...ik,...jk->...ij", sp(q), sp(k), F32) * xla._decay(loc.G, incl)
    dD0 = scale * xla._mm("...ij,...iv->...jv", P, sp(do), F32)
    pdD0 = pbwd.chunk_dd0(q, k, G, do, scale=scale, C=C, cfg=cfg.dd0, interpret=True)
    assert rel_err(sp(pdD0), dD0) < 1e-5
    dh_out, dD, dh0 = pbwd.reverse_state_pass(q, k, G, W, do, pdD0, dfin, m.reset, m.is_last,
                                              m.seq, scale=scale, C=C, cfg=cfg.reverse,
                                              interpret=True)
    xdh, xdh0 = xla.reverse_state_pass(sp(k), loc.G, loc.W, sp(q), sp(do), dD0, dfin, m, scale,
                                       h0.shape[0], F32)
    assert rel_err(jnp.moveaxis(dh_out, 2, 1), xdh) < 1e-5
    assert rel_err(dh0, xdh0) < 1e-5
    dqp, dkp, dW, dGp, dPs = pbwd.chunk_dqkw(q, k, G, h_in, dh_out, do, D, dD, scale=scale,
                                             C=C, cfg=cfg.dqkw, interpret=True)
    xdPs = scale * xla._mm("...iv,...jv->...ij", sp(do), s["xD"], F32) * xla._decay(loc.G, incl)
    assert rel_err(sp(dPs), xdPs) < 1e-5
    # Two K tiles (dPs written by the first only) and two V tiles give the same terms.
    tiled = pbwd.chunk_dqkw(q, k, G, h_in, dh_out, do, D, dD, scale=scale, C=C,
                            cfg=pcfg.StageConfig(block_v=16, block_k=8), interpret=True)
    for a, b in zip(tiled, (dqp, dkp, dW, dGp, dPs)):
        assert rel_err(a, b) < 1e-6
    got = pbwd.chunk_grads(q, k, v, G, beta, lam, Tinv, dD, dW, dqp, dkp, dGp, dPs, C=C,
                           cfg=cfg.grads_v, interpret=True)
    want = xla.chunk_grads(sp(q), sp(k), sp(v), sp(beta), sp(lam), loc, s["xh"], s["xD"], sp(do),
                           xdh, scale, F32)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlam"), got, want):
        assert rel_err(sp(a), b) < 2e-5, name
    got = pbwd.chunk_grads(q, k, v, G, beta, lam, Tinv, dD, dW, dqp, dkp, dGp, dPs, C=C,
                           cfg=cfg.grads_v, interpret=True, cfg_k=pcfg.StageConfig(block_k=8))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlam"), got, want):
        assert rel_err(sp(a), b) < 2e-5, name + " (K slices)"
    # The K side split in two (its [C, C] part, then the products the Mosaic GPU kernel runs,
    # here by their XLA oracle).
    got = pbwd.chunk_grads(q, k, v, G, beta, lam, Tinv, dD, dW, dqp, dkp, dGp, dPs, C=C,
                           cfg=cfg.grads_v, interpret=True, k_products=pbwd.grads_k_products_xla)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlam"), got, want):
        assert rel_err(sp(a), b) < 2e-5, name + " (split K side)"
    # dA and dPs from D (not dW), then the state-side gradients fused with the K side's
    # products: the contracts of the Mosaic GPU kernels, here by their oracles.
    got = pbwd.local_grads_from_d(
        q, k, v, G, beta, lam, Tinv, h_in, dh_out, do, D, dD, scale=scale, C=C,
        cfg_k=cfg.grads_k, interpret=True, v_side=pbwd.grads_v_from_d_xla,
        dqkw_k=functools.partial(pbwd.dqkw_products_ref, C=C, cfg=cfg.dqkw, interpret=True))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlam"), got, want):
        assert rel_err(sp(a), b) < 2e-5, name + " (from D, fused state side)"
    _, _, dA_d, dPs_d, _ = pbwd.grads_v_from_d_xla(v, Tinv, dD, do, D, G, beta, scale=scale)
    _, _, dA_w = pbwd._grads_v_launch(q, k, v, G, beta, lam, Tinv, dD, dW, None, C=C,
                                      cfg=cfg.grads_v, interpret=True)
    assert rel_err(dA_d, dA_w) < 2e-5  # -T^T dD D^T = -T^T dT T^T
    assert rel_err(dPs_d, dPs) < 1e-5
    # Packed rows: documents starting inside chunks (ids per token; gamma past a chunk's first
    # document is zero), the split K side against the one-launch kernel on the same inputs.
    Tp = q.shape[1]
    seg = jnp.broadcast_to(jnp.searchsorted(jnp.array([1, 7, 8, 2 * C - 3, 2 * C + 1]),
                                            jnp.arange(Tp), side="right"), q.shape[:2])
    seg = seg.astype(jnp.int32)
    one = pbwd.chunk_grads(q, k, v, G, beta, lam, Tinv, dD, dW, dqp, dkp, dGp, dPs, seg, C=C,
                           cfg=cfg.grads_v, interpret=True)
    two = pbwd.chunk_grads(q, k, v, G, beta, lam, Tinv, dD, dW, dqp, dkp, dGp, dPs, seg, C=C,
                           cfg=cfg.grads_v, interpret=True, k_products=pbwd.grads_k_products_xla)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlam"), two, one):
        assert rel_err(a, b) < 2e-5, name + " (split K side, packed)"
    gam = pbwd.chunk_gamma(G, seg, C)
    assert float(jnp.max(jnp.abs(gam[:, 1:7]))) == 0.0  # past chunk 0's first document
    assert float(jnp.min(gam[:, C:C + 8])) > 0.0  # chunk 1 starts inside a document


def test_split_k_side_in_bfloat16():
    """bfloat16: the split K side (phase-1 kernel + the products' oracle) against the one-launch
    K-side kernel, on the same inputs; they differ by where T meets its row scales (before or
    after the rounding), within the dtype's tolerance."""
    C, B, T, H, K, V = 32, 2, 64, 2, 32, 32
    (q, k, v, g, beta, lam, _), _ = make(21, B, T, H, K, V, dtype=jnp.bfloat16)
    G = packing.chunk_cumsum(g, C)
    cfg = pcfg.default_config(K, V, C, jnp.bfloat16)
    keys = jax.random.split(jax.random.PRNGKey(22), 6)
    rnd = lambda i, shape, dt=F32: jax.random.normal(keys[i], shape, F32).astype(dt)  # noqa: E731
    _, _, Tinv = pfwd.chunk_local(q, k, v, G, beta, lam, C=C, cfg=cfg.wu, interpret=True)
    dD, dW = rnd(0, v.shape, jnp.bfloat16), rnd(1, q.shape, jnp.bfloat16)
    dqp, dkp, dGp = rnd(2, q.shape), rnd(3, q.shape), rnd(4, G.shape)
    dPs = jnp.tril(rnd(5, (B, T, H, C)))
    args = (q, k, v, G, beta, lam, Tinv, dD, dW, dqp, dkp, dGp, dPs)
    one = pbwd.chunk_grads(*args, C=C, cfg=cfg.grads_v, interpret=True, cfg_k=cfg.grads_k)
    two = pbwd.chunk_grads(*args, C=C, cfg=cfg.grads_v, interpret=True, cfg_k=cfg.grads_k,
                           k_products=pbwd.grads_k_products_xla)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlam"), two, one):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) < TOL[jnp.dtype(jnp.bfloat16)], name


def test_solve_unit_lower_is_the_inverse():
    from qdelta_jax.pallas import _util as u

    C = 64
    key1, key2 = jax.random.split(jax.random.PRNGKey(3))
    A = jnp.tril(jax.random.uniform(key1, (C, C), F32, -1.0, 1.0), -1)
    A = A * jax.random.uniform(key2, (C, 1), F32)  # rows scaled like beta
    T = u.solve_unit_lower(A, jax.lax.Precision.HIGHEST)
    want = jnp.linalg.inv(np.eye(C, dtype=np.float64) + np.asarray(A, np.float64))
    assert rel_err(T, want) < 1e-5


def test_inverse_in_the_compute_dtype_where_no_backward_reads_it():
    """Without a gradient the solve writes ``T`` in the compute dtype (W/U rounds it so before
    its matmuls): the same W and U bit for bit, and the op's forward unchanged."""
    C, B, T, H, K, V = 16, 1, 48, 2, 32, 32
    (q, k, v, g, beta, lam, _), _ = make(13, B, T, H, K, V, dtype=jnp.bfloat16)
    G = packing.chunk_cumsum(g, C)
    cfg = pcfg.default_config(K, V, C, jnp.bfloat16)
    kw = dict(C=C, cfg=cfg.wu, interpret=True, cfg_solve=cfg.solve)
    W, U, T32 = pfwd.chunk_local(q, k, v, G, beta, lam, **kw)
    W2, U2, T16 = pfwd.chunk_local(q, k, v, G, beta, lam, t_float32=False, **kw)
    assert T32.dtype == F32 and T16.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(T16), np.asarray(T32.astype(jnp.bfloat16)))
    assert np.array_equal(np.asarray(W2), np.asarray(W)) and np.array_equal(np.asarray(U2),
                                                                            np.asarray(U))

    def fwd(q, k, v):
        return qdelta_rule(q, k, v, g, beta, lam, chunk_size=C, implementation="pallas")[0]

    o_infer = jax.jit(fwd)(q, k, v)  # the primal: T in bf16
    o_train, _ = jax.jit(lambda *a: jax.vjp(fwd, *a))(q, k, v)  # the custom_vjp forward
    assert np.array_equal(np.asarray(o_infer), np.asarray(o_train))
    jaxpr = str(jax.make_jaxpr(fwd)(q, k, v))
    assert "bf16[1,48,2,16]" in jaxpr and "f32[1,48,2,16]" not in jaxpr  # T, in bf16 only


# ----------------------------------------------------------------------------- qdelta_rule


def test_no_save_residuals_matches_xla():
    """``save_residuals=False``: the backward recomputes W, T, h_in, D (the default keeps them
    from the forward; every other qdelta_rule test runs that)."""
    import dataclasses

    B, T, H, K, V, C = 1, 40, 2, 16, 32, 16
    (q, k, v, g, beta, lam, h0), w = make(5, B, T, H, K, V)
    cfg = dataclasses.replace(pcfg.default_config(K, V, C), save_residuals=False)
    assert pcfg.Config.from_dict(cfg.to_dict()) == cfg
    earlier = {new: old for old, new in pcfg.OLD_NAMES.items()}
    recorded = {earlier.get(k, k): v for k, v in cfg.to_dict().items()}  # as saved before
    assert "a" in recorded and pcfg.Config.from_dict(recorded) == cfg  # read back, renamed
    layout = packing.make_layout(B, T, C, None)
    m = layout.meta
    P = lambda x: packing.to_padded(x, layout)  # noqa: E731

    def loss(core, q, k, v, g, beta, lam, h0):
        G = packing.chunk_cumsum(P(g), C)
        o, fin = core(P(q), P(k), P(v), G, P(beta), P(lam), h0, None, m.reset, m.is_last, m.seq,
                      K**-0.5)
        return jnp.sum(o.astype(F32) * P(w)) + jnp.sum(fin * jnp.cos(h0))

    pc = pcore.make_core(K=K, V=V, dtype=F32, chunk_size=C, config=cfg, interpret=True)
    args = (q, k, v, g, beta, lam, h0)
    got = jax.jit(jax.value_and_grad(lambda *a: loss(pc, *a), argnums=tuple(range(7))))(*args)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(xla.chunked_core, *a),
                                      argnums=tuple(range(7))))(*args)
    assert rel_err(got[0], want[0]) < 2e-5
    for name, a, b in zip(ARGS, got[1], want[1]):
        assert rel_err(a, b) < 2e-5, name


def test_save_residuals_config_switches_the_op_path(monkeypatch):
    """``qdelta_rule(..., config=Config(save_residuals=False))`` reaches the kernels: the
    gradient recomputes (more kernels) and gives the same gradients. Unset, it follows
    ``QDELTA_SAVE_RESIDUALS`` (default on; read strictly) when the call is traced; a call's
    config overrides the environment."""
    (q, k, v, g, beta, lam, h0), w = make(6, 1, 40, 2, 16, 32)

    def grad_fn(config=None):
        def loss(q, k, v, g, beta, lam, h0):
            o, fin = qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, chunk_size=16,
                                 output_final_state=True, implementation="pallas",
                                 config=config)
            return jnp.sum(o * w) + jnp.sum(fin * h0)

        return jax.grad(loss, argnums=tuple(range(7)))

    args = (q, k, v, g, beta, lam, h0)
    kernels = lambda f: str(jax.make_jaxpr(f)(*args)).count("pallas_call")  # noqa: E731
    with pytest.raises(TypeError, match="bool"):
        pcfg.Config(save_residuals=1)
    with pytest.raises(TypeError, match="config must be a qdelta_jax.pallas.Config"):
        qdelta_rule(q, k, v, g, beta, lam, implementation="pallas", config={"a": 1})
    monkeypatch.delenv("QDELTA_SAVE_RESIDUALS", raising=False)
    assert pcfg.get_config(16, 32, 16, F32).save_residuals
    off = pcfg.Config(save_residuals=False)
    assert not pcfg.get_config(16, 32, 16, F32, off).save_residuals
    n_on, n_off = kernels(grad_fn()), kernels(grad_fn(off))
    assert n_on < n_off, (n_on, n_off)
    g_on, g_off = jax.jit(grad_fn())(*args), jax.jit(grad_fn(off))(*args)
    for a, b in zip(g_on, g_off):
        assert rel_err(a, b) < 1e-6
    monkeypatch.setenv("QDELTA_SAVE_RESIDUALS", "0")  # the default, for calls that leave it unset
    assert kernels(grad_fn()) == n_off
    assert kernels(grad_fn(pcfg.Config(save_residuals=True))) == n_on
    for raw, want in (("", True), ("1", True), ("off", False), ("No", False)):
        monkeypatch.setenv("QDELTA_SAVE_RESIDUALS", raw)
        assert pcfg.default_save_residuals() is want
    monkeypatch.setenv("QDELTA_SAVE_RESIDUALS", "maybe")
    with pytest.raises(ValueError, match="QDELTA_SAVE_RESIDUALS"):
        pcfg.default_save_residuals()


def test_bad_sizes_raise():
    (q, k, v, g, beta, lam, _), _ = make(0, 1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        qdelta_rule(q, k, v, g, beta, lam, chunk_size=128, implementation="pallas")
    (q, k, v, g, beta, lam, _), _ = make(0, 1, 8, 1, 300, 16)
    with pytest.raises(ValueError, match="K=300"):
        qdelta_rule(q, k, v, g, beta, lam, implementation="pallas")
    (q, k, v, g, beta, lam, _), _ = make(0, 1, 8, 1, 16, 600)
    with pytest.raises(ValueError, match="V=600"):
        qdelta_rule(q, k, v, g, beta, lam, implementation="pallas")


# ----------------------------------------------------------------------------- config, check


def test_config_defaults_and_cache(tmp_path, monkeypatch):
    cfg = pcfg.default_config(128, 256, 64)
    assert cfg.state.block_v == 64 and cfg.dqkw.block_k == 128 and cfg.output.block_v == 256
    assert cfg.solve.num_warps == 1 and cfg.solve.block_k == 128 and cfg.wu.block_v == 64
    assert cfg.save_residuals
    assert cfg.state.num_warps == cfg.reverse.num_warps == 4
    assert pcfg.default_config(256, 512, 64).output.block_v == 128
    assert pcfg.Config.from_dict(cfg.to_dict()) == cfg
    assert pcfg.padded_size(24) == 32 and pcfg.padded_size(5) == 16
    monkeypatch.setattr(pcfg, "CACHE_FILE", tmp_path / "none.json")
    assert pcfg.get_config(24, 40, 32, F32) == pcfg.default_config(32, 64, 32, F32)
    f32 = pcfg.default_config(128, 256, 64, F32)  # shared memory: smaller tiles in float32
    assert f32.output.block_v == 128 and f32.dqkw.block_k == 64 and f32.reverse.num_stages == 1
    f32 = pcfg.default_config(256, 512, 64, F32)
    assert f32.output.block_k == f32.grads_k.block_k == 128 and f32.reverse.block_v == 16
    assert pcfg.default_config(128, 256, 64, jnp.bfloat16) == cfg


def test_check_small_runs(capsys):
    from qdelta_jax import check

    assert check.main(["--small", "--dtype", "float32", "--shapes", "1x33x1x16x16"]) == 0
    with pytest.raises(SystemExit):
        check.main(["--shapes", "1x2x3"])
    assert "--shapes: shape must be BxTxHxKxV" in capsys.readouterr().err


# ----------------------------------------------------------------------------- packed rows


CU_ROWS = jnp.asarray(op_suite.CU_ROWS, jnp.int32)


def packed_value_and_grads(impl, C, cu, config=None):
    def loss(q, k, v, g, beta, lam, w):
        o, _ = qdelta_rule(q, k, v, g, beta, lam, chunk_size=C, cu_seqlens=cu,
                           implementation=impl, config=config)
        return jnp.sum(o.astype(F32) * w), o

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))


def test_sequential_block_v_follows_the_grid():
    cfg = pcfg.default_config(128, 256, 64)
    assert cfg.state.block_v == 64
    # B8 H6: 48 rows x 4 tiles = 192 programs for 132 SMs: kept.
    assert pcore.sequential_block_v(cfg, 48, 256, 132) == cfg
    # B2 H6: 12 rows x 4 tiles = 48 programs: tiles of 32 (96 programs, at least half of 132).
    fit = pcore.sequential_block_v(cfg, 12, 256, 132)
    assert fit.state.block_v == 32 and fit.reverse.block_v == 32
    assert fit.output == cfg.output  # only the sequential passes change
    # B1 H2: 2 rows: 16 is the floor.
    assert pcore.sequential_block_v(cfg, 2, 256, 132).state.block_v == 16
    assert pcore.sequential_block_v(cfg, 24, 256, 132) == cfg  # B4 H6: 96 programs
    assert pcore.sequential_block_v(cfg, 1024, 256, 132) == cfg
    assert pcore.sequential_block_v(cfg, 12, 256, None) == cfg


def test_mosaic_block_v_follows_the_grid(monkeypatch):
    """V tiles of 32 for the Mosaic kernels where tiles of 64 launch fewer CTAs than the chip
    has multiprocessors; ``Config.mosaic_block_v`` overrides the choice and reaches the
    kernels' config."""
    assert pcore.mosaic_block_v(48, 256, 132) == 64  # B8 H6: 192 CTAs
    assert pcore.mosaic_block_v(128, 128, 132) == 64  # B8 H16 V128: 256 CTAs
    assert pcore.mosaic_block_v(12, 256, 132) == 32  # B2 H6: 48 CTAs
    assert pcore.mosaic_block_v(12, 256, None) == 64  # unknown chip: as before
    assert pcore.mosaic_block_v(2, 16, 132) == 64  # V 16 does not split into 32s
    cfg = pcfg.Config(mosaic_block_v=32)
    assert pcfg.Config.from_dict(cfg.to_dict()) == cfg
    assert pcfg.get_config(128, 256, 64, jnp.bfloat16, cfg).mosaic_block_v == 32
    for bad in (48, True, "32"):
        with pytest.raises(ValueError, match="mosaic_block_v"):
            pcfg.Config(mosaic_block_v=bad)
    monkeypatch.setattr(pcore, "mosaic_reason", lambda *a, **k: None)
    use = pcore.choose_mosaic("auto", 128, 256, 64, jnp.bfloat16, jnp.bfloat16, interpret=False,
                              rows_are_sequences=True, seg=None, block_v=32)
    assert use.cfg.block_v == 32 and use.train  # "auto" trains on Mosaic GPU where it can
    assert use.reverse_cfg is None  # the reverse pass at the state pass's depth
    use = pcore.choose_mosaic("auto", 128, 256, 64, jnp.bfloat16, jnp.bfloat16, interpret=False,
                              rows_are_sequences=True, seg=None, block_v=64, reverse_steps=1)
    assert use.cfg.max_concurrent_steps == 2 and use.reverse_cfg.max_concurrent_steps == 1
    seen = []
    monkeypatch.setattr(pcore, "choose_mosaic",
                        lambda *a, block_v, **k: seen.append(block_v) or None)
    monkeypatch.setattr(pcore, "_sm_count", lambda: 132)
    (q, k, v, g, beta, lam, _), _ = make(52, 2, 64, 6, 16, 64)
    for impl, config, want in (("pallas", None, 32), ("pallas", pcfg.Config(mosaic_block_v=64), 64),
                               ("pallas-mosaic", None, 32),
                               ("pallas-mosaic", pcfg.Config(mosaic_block_v=64), 64)):
        qdelta_rule(q, k, v, g, beta, lam, chunk_size=16, implementation=impl, config=config)
        assert seen.pop() == want  # B2 H6 V64: 12 CTAs at tiles of 64
    # The pipeline depth: 2 unless the config says otherwise, then as given.
    depths = []
    monkeypatch.setattr(pcore, "choose_mosaic",
                        lambda *a, steps, reverse_steps, **k: depths.append(
                            (steps, reverse_steps)) or None)
    # (tiles of 32 here: the reverse pass keeps depth 2; at tiles of 64 it takes 1)
    for config, want in ((None, (2, 2)), (pcfg.Config(mosaic_block_v=64), (2, 1)),
                         (pcfg.Config(mosaic_steps=1), (1, 1))):
        qdelta_rule(q, k, v, g, beta, lam, chunk_size=16, implementation="pallas-mosaic",
                    config=config)
        assert depths.pop() == want
    for bad in (0, 5, True, 1.0):
        with pytest.raises(ValueError, match="mosaic_steps"):
            pcfg.Config(mosaic_steps=bad)
    cfg = pcfg.Config(mosaic_steps=1)
    assert pcfg.Config.from_dict(cfg.to_dict()) == cfg
    monkeypatch.setattr(pcore, "choose_mosaic",
                        lambda *a, block_v, **k: seen.append(block_v) or None)
    # Packed rows on Mosaic keep tiles of 64 unless told otherwise.
    cu = jnp.array([[0, 20, 64], [0, 64, 64]], jnp.int32)
    for impl in ("pallas-mosaic", "pallas"):
        for config, want in ((None, 64), (pcfg.Config(mosaic_block_v=32), 32)):
            qdelta_rule(q, k, v, g, beta, lam, chunk_size=16, implementation=impl,
                        config=config, cu_seqlens=cu)
            assert seen.pop() == want


def test_forward_backend_choice_off_the_gpu():
    (q, k, v, g, beta, lam, _), _ = make(51, 1, 20, 1, 16, 16)
    o_t, _ = qdelta_rule(q, k, v, g, beta, lam, chunk_size=16, implementation="pallas-triton")
    o_x, _ = qdelta_rule(q, k, v, g, beta, lam, chunk_size=16, implementation="xla")
    assert rel_err(o_t, o_x) < TOL[jnp.dtype(F32)]
    with pytest.raises(ValueError, match="Mosaic GPU forward cannot run this call: kernels run in"):
        qdelta_rule(q, k, v, g, beta, lam, chunk_size=16, implementation="pallas-mosaic")
    assert pcore.mosaic_reason(128, 256, 64, jnp.bfloat16, jnp.bfloat16, interpret=False,
                               rows_are_sequences=False, seg=None) is not None
    with pytest.raises(ValueError, match="forward_backend"):
        pcore.make_core(K=16, V=16, dtype=F32, chunk_size=16, forward_backend="cuda")


def _meta_like_mosaic(B, Tp, C, seg):
    """The chunk bookkeeping the Mosaic kernels derive themselves: one sequence per row, or
    the row-aligned packed layout (resets where a document starts at a chunk)."""
    if seg is None:
        return packing.make_layout(B, Tp, C, None).meta
    return packing.row_aligned_meta(seg, C)


@pytest.fixture
def mosaic_standins(monkeypatch):
    """The Mosaic GPU kernels of implementation='pallas-mosaic' replaced by stand-ins of the same
    contract built from the Triton kernels (interpret mode) and the XLA oracles; returns the
    list the stand-ins append their names to, in call order."""
    from qdelta_jax.pallas import mosaic, mosaic_backward, mosaic_local

    cfg = pcfg.StageConfig(num_warps=4)

    def state_output(q, k, G, W, U, h0, seg=None, *, scale, out_dtype=None, residuals=False,
                     C=64, cfg_=None, **kw):
        B, Tp = q.shape[:2]
        m = _meta_like_mosaic(B, Tp, C, seg)
        h_in, D, fin = pfwd.state_pass(k, G, W, U, h0, m.reset, m.is_last, m.seq, seg, C=C,
                                       cfg=cfg, interpret=True)
        o = pfwd.chunk_output(q, k, G, h_in, D, seg, scale=scale, out_dtype=out_dtype, C=C,
                              cfg=cfg, interpret=True)
        return (o, fin, h_in, D) if residuals else (o, fin)

    def reverse_state_pass(q, k, G, W, do, dD0, dfinal, seg=None, *, scale, C=64, **kw):
        B, Tp = q.shape[:2]
        m = _meta_like_mosaic(B, Tp, C, seg)
        if dD0 is None:  # Config(mosaic_fused_dd0=True): the kernel forms it
            calls.append("dd0 in rev")
            dD0 = pbwd.chunk_dd0(q, k, G, do, seg, scale=scale, C=C, cfg=cfg, interpret=True)
        return pbwd.reverse_state_pass(q, k, G, W, do, dD0, dfinal, m.reset, m.is_last, m.seq,
                                       seg, scale=scale, C=C, cfg=cfg, interpret=True)

    def chunk_dqkw(*a, scale, C=64):
        return pbwd.chunk_dqkw(*a, scale=scale, C=C, cfg=pcfg.StageConfig(num_warps=4),
                               interpret=True)

    def grads_k_products(*a):
        calls.append("grads_k")
        return pbwd.grads_k_products_xla(*a)

    def grads_v_from_d(*a, **kw):
        calls.append("grads_v from D")
        return pbwd.grads_v_from_d_xla(*a, **kw)

    def dqkw_products(*a, scale):
        calls.append("dqkw + grads_k")
        C = a[8].shape[-1]  # Tb [B, Tp, H, C]
        return pbwd.dqkw_products_ref(*a, scale=scale, C=C, interpret=True)

    def chunk_local(q, k, v, G, beta, lam, seg=None, *, C=64, with_t=True):
        calls.append("local")
        W, U, T = pfwd.chunk_local(q, k, v, G, beta, lam, seg, C=C, cfg=cfg, interpret=True)
        return W, U, (T if with_t else None)

    calls = []
    monkeypatch.setattr(mosaic_local, "chunk_local", chunk_local)
    monkeypatch.setattr(mosaic_local, "check_supported", lambda **k: None)
    monkeypatch.setattr(mosaic, "state_output",
                        lambda *a, **k: calls.append("fwd") or state_output(*a, **k))
    monkeypatch.setattr(mosaic, "reverse_state_pass",
                        lambda *a, **k: calls.append("rev") or reverse_state_pass(*a, **k))
    monkeypatch.setattr(mosaic_backward, "chunk_dqkw",
                        lambda *a, **k: calls.append("dqkw") or chunk_dqkw(*a, **k))
    monkeypatch.setattr(mosaic_backward, "check_supported", lambda **k: None)
    monkeypatch.setattr(mosaic_backward, "grads_k_products", grads_k_products)
    monkeypatch.setattr(mosaic_backward, "check_products_supported", lambda **k: None)
    monkeypatch.setattr(mosaic_backward, "grads_v_from_d", grads_v_from_d)
    monkeypatch.setattr(mosaic_backward, "dqkw_products", dqkw_products)
    monkeypatch.setattr(mosaic_backward, "check_grads_v_from_d_supported", lambda **k: None)
    monkeypatch.setattr(mosaic_backward, "check_dqkw_products_supported", lambda **k: None)
    monkeypatch.setattr(pcore, "mosaic_reason", lambda *a, **k: None)
    return calls


def test_mosaic_training_dispatch_wiring(mosaic_standins):
    """implementation='pallas-mosaic' (training on the Mosaic kernels) with stand-ins of the same
    contract built from the Triton kernels: the residuals, the reverse pass and the packed-rows
    handling reach the backward as they should (the kernels themselves are checked on the GPU
    by benchmarks/mosaic_dev.py)."""
    calls = mosaic_standins
    C = 16
    (q, k, v, g, beta, lam, h0), w = make(61, 2, 40, 2, 16, 16)
    args = (q, k, v, g, beta, lam, h0)
    (_, (o_x, f_x)), g_x = value_and_grads("xla", C)(*args, w)
    tol = TOL[jnp.dtype(F32)]
    # By default (unpacked rows) the reverse pass forms dD0 itself, the V side forms dA and
    # dPs from D, and one kernel runs the state-side gradients with the K side's products.
    # Config(mosaic_fused_local=False) keeps those two in separate Mosaic kernels;
    # Config(mosaic_dqkw=False) the Triton dqkw kernel, Config(mosaic_grads_k=False) the
    # one-launch Triton K side (neither fused), Config(mosaic_fused_dd0=False) the chunk_dd0
    # launch.
    fused = ["local", "fwd", "rev", "dd0 in rev", "grads_v from D", "dqkw + grads_k"]
    split = ["local", "fwd", "rev", "dd0 in rev", "dqkw", "grads_k"]
    for config, want in ((None, fused), (pcfg.Config(mosaic_fused_local=True), fused),
                         (pcfg.Config(mosaic_fused_local=False), split),
                         (pcfg.Config(mosaic_dqkw=False), ["local", "fwd", "rev", "dd0 in rev",
                                                           "grads_k"]),
                         (pcfg.Config(mosaic_fused_dd0=False),
                          ["local", "fwd", "rev", "grads_v from D", "dqkw + grads_k"]),
                         (pcfg.Config(mosaic_grads_k=False), split[:-1])):
        calls.clear()
        (_, (o_m, f_m)), g_m = value_and_grads("pallas-mosaic", C, config=config)(*args, w)
        assert calls == want
        assert rel_err(o_m, o_x) < tol and rel_err(f_m, f_x) < tol
        for name, a, b in zip(ARGS, g_m, g_x):
            assert rel_err(a, b) < tol, name
    with pytest.raises(TypeError, match="mosaic_dqkw"):
        pcfg.Config(mosaic_dqkw=1)
    # implementation="pallas" trains on the Mosaic kernels wherever they take the call.
    calls.clear()
    (_, (o_a, _)), g_a = value_and_grads("pallas", C)(*args, w)
    assert calls == fused and rel_err(o_a, o_x) < tol
    for name, a, b in zip(ARGS, g_a, g_x):
        assert rel_err(a, b) < tol, name
    wp = w
    # Packed rows, by default: the fused path with its document masks (dPs within documents,
    # gamma, e, aC per document). With Config(mosaic_fused_local=False): the Triton state-side
    # gradients and V side (the Mosaic chunk_dqkw takes no document ids), the K-side products
    # (no document masks of their own) on Mosaic GPU.
    (_, o_px), gpx = packed_value_and_grads("xla", C, CU_ROWS)(q, k, v, g, beta, lam, wp)
    for config, want in ((pcfg.Config(mosaic_fused_local=False),
                          ["local", "fwd", "rev", "dd0 in rev", "grads_k"]),
                         (None, ["local", "fwd", "rev", "dd0 in rev", "grads_v from D",
                                 "dqkw + grads_k"])):
        calls.clear()
        (_, o_p), gp = packed_value_and_grads("pallas-mosaic", C, CU_ROWS, config)(
            q, k, v, g, beta, lam, wp)
        assert calls == want
        assert rel_err(o_p, o_px) < tol
        for name, a, b in zip(("q", "k", "v", "g", "beta", "lam"), gp, gpx):
            assert rel_err(a, b) < tol, name
    calls.clear()
    (_, o_p), gp = packed_value_and_grads("pallas", C, CU_ROWS)(q, k, v, g, beta, lam, wp)
    assert calls == ["local", "fwd", "rev", "dd0 in rev", "grads_v from D", "dqkw + grads_k"]
    assert rel_err(o_p, o_px) < tol


@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_mosaic_local_stage_wiring(mosaic_standins, dtype):
    """The Mosaic forward's local stage (A, T, W, U) comes from the Mosaic GPU kernel (a
    stand-in of its contract here) in training, with T for the backward, and in inference,
    without; packed rows too; Config(mosaic_local=False): the Triton solve and W/U."""
    calls = mosaic_standins
    C = 16
    (q, k, v, g, beta, lam, h0), w = make(63, 2, 40, 2, 16, 32, dtype=dtype)
    args = (q, k, v, g, beta, lam, h0)
    (_, (o_x, f_x)), g_x = value_and_grads("xla", C)(*args, w)
    tol = TOL[jnp.dtype(dtype)]
    on = pcfg.Config(mosaic_local=True)
    for config, first in ((None, "local"), (pcfg.Config(mosaic_local=False), "fwd"),
                          (on, "local")):
        calls.clear()
        (_, (o_m, f_m)), g_m = value_and_grads("pallas-mosaic", C, config=config)(*args, w)
        assert calls[0] == first and calls.count("local") == (first == "local")
        assert rel_err(o_m, o_x) < tol and rel_err(f_m, f_x) < tol
        for name, a, b in zip(ARGS, g_m, g_x):
            assert rel_err(a, b) < tol, name
    calls.clear()
    o_i, _ = qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, chunk_size=C,
                         implementation="pallas-mosaic", config=on)
    assert calls == ["local", "fwd"]
    assert rel_err(o_i, o_x) < tol
    (_, o_px), gpx = packed_value_and_grads("xla", C, CU_ROWS)(q, k, v, g, beta, lam, w)
    calls.clear()
    (_, o_p), gp = packed_value_and_grads("pallas-mosaic", C, CU_ROWS, on)(
        q, k, v, g, beta, lam, w)
    assert calls[:2] == ["local", "fwd"]
    assert rel_err(o_p, o_px) < tol
    for name, a, b in zip(("q", "k", "v", "g", "beta", "lam"), gp, gpx):
        assert rel_err(a, b) < tol, name
    assert pcfg.split_variant("pallas-mosaic+mloc") == ("pallas-mosaic", on)
    assert pcfg.split_variant("pallas-mosaic+tloc")[1] == pcfg.Config(mosaic_local=False)
    with pytest.raises(TypeError, match="mosaic_local"):
        pcfg.Config(mosaic_local="yes")


def test_mosaic_backward_variants_in_bfloat16(mosaic_standins):
    """bfloat16 through the Mosaic backward's variants (stand-ins of the kernels' contracts):
    dA, dPs from the forward's rounded D with the state side fused to the K side's products
    (the default), and the separate kernels, against the XLA path on the same inputs."""
    calls = mosaic_standins
    C = 16
    (q, k, v, g, beta, lam, h0), w = make(62, 2, 48, 2, 16, 32, dtype=jnp.bfloat16)
    args = (q, k, v, g, beta, lam, h0)
    (_, (o_x, f_x)), g_x = value_and_grads("xla", C)(*args, w)
    tol = TOL[jnp.dtype(jnp.bfloat16)]
    for config, last in ((None, "dqkw + grads_k"),
                         (pcfg.Config(mosaic_fused_local=False), "grads_k")):
        calls.clear()
        (_, (o_m, f_m)), g_m = value_and_grads("pallas-mosaic", C, config=config)(*args, w)
        assert calls[-1] == last
        assert rel_err(o_m, o_x) < tol and rel_err(f_m, f_x) < tol
        for name, a, b in zip(ARGS, g_m, g_x):
            assert a.dtype == b.dtype, name
            assert rel_err(a, b) < tol, name


def test_mosaic_choice_per_backend(monkeypatch):
    """'auto' and 'mosaic' train on the Mosaic kernels wherever they take the call, packed rows
    included; where only the no-gradient forward fits, 'auto' takes that for unpacked rows
    (the Triton kernels for packed ones) and 'mosaic' raises with the reason; 'triton' never
    asks."""
    reasons = {True: None, False: None}
    monkeypatch.setattr(pcore, "mosaic_reason", lambda *a, train=False, **k: reasons[train])
    choose = lambda backend, seg=None: pcore.choose_mosaic(  # noqa: E731
        backend, 128, 256, 64, jnp.bfloat16, jnp.bfloat16, interpret=False,
        rows_are_sequences=True, seg=seg)
    seg = jnp.zeros((1, 64), jnp.int32)
    for backend in ("auto", "mosaic"):
        assert choose(backend).train and choose(backend, seg).train
    assert choose("triton") is None
    reasons[True] = "no residual outputs here"
    assert not choose("auto").train  # the forward only
    assert choose("auto", seg=seg) is None
    with pytest.raises(ValueError, match="cannot run this call: no residual outputs here"):
        choose("mosaic")
    reasons[False] = "not sm_90"
    assert choose("auto") is None
