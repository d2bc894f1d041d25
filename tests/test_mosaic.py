"""The Mosaic GPU kernel off the GPU: its checks, and its whole Mosaic GPU lowering for cuda
(register layouts, shared memory transforms, the TMA pipeline), which runs on a CPU-only jax.
Its numerics are checked on the GPU by ``benchmarks/mosaic_dev.py``: Mosaic GPU interpret mode
does not run this kernel (see :mod:`qdelta_jax.pallas.mosaic`)."""

import jax
import jax.numpy as jnp
import pytest

from qdelta_jax.pallas import mosaic, mosaic_backward

F32 = jnp.float32
BF16 = jnp.bfloat16


def _args(B, T, H, K, V, dt=BF16):
    S = jax.ShapeDtypeStruct
    return (S((B, T, H, K), dt), S((B, T, H, K), dt), S((B, T, H), F32),
            S((B, T, H, K), dt), S((B, T, H, V), dt), S((B, H, K, V), F32))


needs_plgpu = pytest.mark.skipif(not mosaic.available(), reason="no Mosaic GPU in this jax")


@needs_plgpu
@pytest.mark.parametrize("cfg", [
    mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2),
    mosaic.MosaicConfig(block_v=128, max_concurrent_steps=1),
    # V tiles of 32: the [C, K] operands take the [*, 32] operands' 64-byte swizzle
    mosaic.MosaicConfig(block_v=32, max_concurrent_steps=3),
])
def test_lowers_for_cuda(cfg):
    f = jax.jit(lambda *a: mosaic.state_output(*a, scale=0.1, cfg=cfg))
    text = f.trace(*_args(1, 128, 2, 128, 256)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@needs_plgpu
@pytest.mark.parametrize("residuals, segmented, cfg", [
    (True, False, mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2)),
    (True, False, mosaic.MosaicConfig(block_v=128, max_concurrent_steps=1, scale_operands=True)),
    (False, True, mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2, scale_operands=True)),
    (True, True, mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2)),
    (True, True, mosaic.MosaicConfig(block_v=32, max_concurrent_steps=2)),
])
def test_residuals_and_documents_lower_for_cuda(residuals, segmented, cfg):
    B, T, H, K, V = 2, 192, 2, 128, 256
    args = _args(B, T, H, K, V) + ((jax.ShapeDtypeStruct((B, T), jnp.int32),) if segmented
                                   else ())
    f = jax.jit(lambda *a: mosaic.state_output(*a, scale=0.1, residuals=residuals, cfg=cfg))
    traced = f.trace(*args)
    shapes = [(o.shape, o.dtype) for o in jax.tree.leaves(traced.out_info)]
    want = [((B, T, H, V), BF16), ((B, H, K, V), F32)]
    if residuals:  # h_in and D as pallas.forward.state_pass writes them
        want += [((B, T // 64, H, K, V), BF16), ((B, T, H, V), BF16)]
    assert shapes == want
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@needs_plgpu
@pytest.mark.parametrize("segmented, cfg, fused_dd0", [
    (False, mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2), False),
    (True, mosaic.MosaicConfig(block_v=64, max_concurrent_steps=1), False),
    (False, mosaic.MosaicConfig(block_v=32, max_concurrent_steps=2), False),
    (False, mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2), True),
    (True, mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2), True),
    (False, mosaic.MosaicConfig(block_v=32, max_concurrent_steps=2), True),
])
def test_reverse_state_pass_lowers_for_cuda(segmented, cfg, fused_dd0):
    """Also with ``dD0=None`` (the kernel forms ``scale P^T dO`` itself)."""
    B, T, H, K, V = 2, 192, 2, 128, 128
    S = jax.ShapeDtypeStruct
    q, k, G, W, U, dfin = _args(B, T, H, K, V)
    seg = (S((B, T), jnp.int32),) if segmented else ()
    f = jax.jit(lambda *a: mosaic.reverse_state_pass(*a[:5], None, *a[5:], scale=0.1, cfg=cfg)
                if fused_dd0 else mosaic.reverse_state_pass(*a, scale=0.1, cfg=cfg))
    args = ((q, k, G, W, U, dfin) if fused_dd0 else (q, k, G, W, U, U, dfin)) + seg
    traced = f.trace(*args)
    # dh_out, dD and dh0 as pallas.backward.reverse_state_pass writes them
    assert [(o.shape, o.dtype) for o in jax.tree.leaves(traced.out_info)] == [
        ((B, T // 64, H, K, V), BF16), ((B, T, H, V), BF16), ((B, H, K, V), F32)]
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@needs_plgpu
def test_reverse_state_pass_checks_arguments():
    q, k, G, W, U, dfin = (jnp.zeros(a.shape, a.dtype) for a in _args(1, 128, 1, 128, 128))
    with pytest.raises(ValueError, match="dD0 has shape"):
        mosaic.reverse_state_pass(q, k, G, W, U, U[:, :64], dfin, scale=0.1)
    with pytest.raises(ValueError, match="do has dtype"):
        mosaic.reverse_state_pass(q, k, G, W, U.astype(F32), U, dfin, scale=0.1)
    with pytest.raises(ValueError, match="reverse pass needs"):
        mosaic.reverse_state_pass(q, k, G, W, U, U, dfin, scale=0.1,
                                  cfg=mosaic.MosaicConfig(block_v=128, max_concurrent_steps=2))


@pytest.mark.parametrize("kw, match", [
    (dict(K=128, V=256, C=32, dtype=BF16), "chunk_size=64"),
    (dict(K=96, V=256, C=64, dtype=BF16), "K=96"),
    (dict(K=128, V=256, C=64, dtype=F32), "dtype=float32"),
    (dict(K=128, V=96, C=64, dtype=BF16), "V=96"),
    (dict(K=256, V=256, C=64, dtype=BF16,
          cfg=mosaic.MosaicConfig(block_v=128, max_concurrent_steps=2)), "shared memory"),
    (dict(K=128, V=256, C=64, dtype=BF16, residuals=True,
          cfg=mosaic.MosaicConfig(block_v=128, max_concurrent_steps=2)), "residuals need"),
])
def test_check_supported_names_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        mosaic.check_supported(**kw)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="block_v"):
        mosaic.MosaicConfig(block_v=16)
    with pytest.raises(ValueError, match="max_concurrent_steps"):
        mosaic.MosaicConfig(max_concurrent_steps=0)
    with pytest.raises(ValueError, match="lowering_semantics"):
        mosaic.MosaicConfig(lowering_semantics="thread")
    with pytest.raises(ValueError, match="scale_operands"):
        mosaic.MosaicConfig(scale_operands=1)


def test_smem_accounting():
    """Residuals move h and D into the pipeline's buffers (steps copies instead of one);
    scale_operands drops the decayed D; documents add two [C] int32 vectors per step."""
    base = mosaic.smem_bytes(128, 64, 64, 2, 2, 2)
    hd = (128 * 64 + 64 * 64) * 2
    assert mosaic.smem_bytes(128, 64, 64, 2, 2, 2, residuals=True) == base + hd
    assert mosaic.smem_bytes(128, 64, 64, 2, 2, 2, scale_operands=True) == base - 64 * 64 * 2
    assert mosaic.smem_bytes(128, 64, 64, 2, 2, 2, segmented=True) == base + 2 * 8 * 64
    # the 340M layer's training configuration fits
    mosaic.check_supported(K=128, V=256, C=64, dtype=BF16, residuals=True, segmented=True,
                           cfg=mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2))


@needs_plgpu
@pytest.mark.parametrize("kind, residuals, steps", [
    ("forward", False, 1), ("forward", True, 1), ("forward", True, 2),
    ("reverse", None, 1), ("reverse", None, 2),
])
def test_lowered_smem_is_the_accounted_one(monkeypatch, kind, residuals, steps):
    """The shared memory Pallas reserves for the lowered kernel is what ``smem_bytes`` /
    ``reverse_smem_bytes`` count, up to alignment: the float32 ``[K, BV]`` tile of the initial
    and final state shares the pipeline buffers' bytes (scoped before and after the pipeline)
    instead of adding to them, so that at one step and tiles of 64 two CTAs fit on an sm_90
    multiprocessor (228 KiB, 1 KiB reserved per CTA)."""
    from jax._src.pallas.mosaic_gpu import lowering as mgpu_lowering

    seen = []
    estimate = mgpu_lowering._estimate_resources

    def spy(ctx, jaxpr):
        r = estimate(ctx, jaxpr)
        seen.append(r.smem_scratch_bytes)
        return r

    monkeypatch.setattr(mgpu_lowering, "_estimate_resources", spy)
    B, T, H, K, V = 1, 256, 2, 128, 256
    cfg = mosaic.MosaicConfig(block_v=64, max_concurrent_steps=steps)
    q = jax.ShapeDtypeStruct((B, T, H, K), BF16)
    G = jax.ShapeDtypeStruct((B, T, H), F32)
    vv = jax.ShapeDtypeStruct((B, T, H, V), BF16)
    st = jax.ShapeDtypeStruct((B, H, K, V), F32)
    args = (q, q, G, q, vv, st)  # q, k, G, W, U or dO, h0 or dfinal
    if kind == "forward":
        f = jax.jit(lambda *a: mosaic.state_output(*a, scale=0.1, residuals=residuals, cfg=cfg))
        want = mosaic.smem_bytes(K, 64, 64, 2, steps, 2, residuals)
    else:
        f = jax.jit(lambda q, k, G, W, do, df: mosaic.reverse_state_pass(
            q, k, G, W, do, None, df, scale=0.1, cfg=cfg))
        want = mosaic.reverse_smem_bytes(K, 64, 64, 2, steps, fused_dd0=True)
    f.trace(*args).lower(lowering_platforms=("cuda",))
    got = max(seen)
    assert want <= got <= want + 1024, (got, want)
    if steps == 1:
        assert 2 * (got + 1024) <= 228 * 1024


@needs_plgpu
def test_state_output_checks_shapes():
    q, k, G, W, U, h0 = (jnp.zeros(a.shape, a.dtype) for a in _args(1, 128, 1, 128, 128))
    with pytest.raises(ValueError, match="h0 has shape"):
        mosaic.state_output(q, k, G, W, U, h0[:, :, :64], scale=0.1)
    with pytest.raises(ValueError, match="W has dtype"):
        mosaic.state_output(q, k, G, W.astype(F32), U, h0, scale=0.1)
    seg = jnp.zeros((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="seg has shape"):
        mosaic.state_output(q, k, G, W, U, h0, seg[:, :64], scale=0.1)
    with pytest.raises(ValueError, match="seg must hold integer"):
        mosaic.state_output(q, k, G, W, U, h0, seg.astype(F32), scale=0.1)


@needs_plgpu
@pytest.mark.parametrize("block_v", [64, 32])
def test_dqkw_lowers_for_cuda(block_v):
    """The Mosaic GPU state-side gradients: the outputs of the Triton chunk_dqkw, lowered."""
    B, T, H, K, V = 2, 192, 2, 128, 256
    NC = T // 64
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), BF16), S((B, T, H, K), BF16), S((B, T, H), F32),
            S((B, NC, H, K, V), BF16), S((B, NC, H, K, V), BF16)) + (S((B, T, H, V), BF16),) * 3
    f = jax.jit(lambda *a: mosaic_backward.chunk_dqkw(*a, scale=0.1, block_v=block_v))
    traced = f.trace(*args)
    assert [(o.shape, o.dtype) for o in jax.tree.leaves(traced.out_info)] == [
        ((B, T, H, K), F32), ((B, T, H, K), F32), ((B, T, H, K), BF16), ((B, T, H), F32),
        ((B, T, H, 64), F32)]
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@needs_plgpu
def test_grads_k_products_lower_for_cuda():
    """The Mosaic GPU K-side products: the outputs of their XLA oracle, lowered."""
    B, T, H, K, C = 2, 192, 2, 128, 64
    S = jax.ShapeDtypeStruct
    rk, rc, vec = (B, T, H, K), (B, T, H, C), (B, T, H)
    args = (S(rk, BF16), S(rk, BF16), S(rc, F32), S(rk, BF16), S(rc, BF16), S(rc, BF16),
            S(rk, F32), S(rk, F32), S(vec, F32), S(vec, F32))
    traced = jax.jit(mosaic_backward.grads_k_products).trace(*args)
    assert [(o.shape, o.dtype) for o in jax.tree.leaves(traced.out_info)] == [
        (rk, BF16), (rk, BF16), (vec, F32), (vec, F32)]
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@needs_plgpu
@pytest.mark.parametrize("block_v,packed", [(32, False), (64, False), (32, True)])
def test_grads_v_from_d_lowers_for_cuda(block_v, packed):
    """dv, dbeta's V part, dA and dPs from D (the fused backward's V side), lowered; with
    document ids for packed rows too."""
    B, T, H, V, C = 2, 192, 2, 256, 64
    S = jax.ShapeDtypeStruct
    rv, rc, vec = (B, T, H, V), (B, T, H, C), (B, T, H)
    args = (S(rv, BF16), S(rc, F32), S(rv, BF16), S(rv, BF16), S(rv, BF16), S(vec, F32),
            S(vec, F32)) + ((S((B, T), jnp.int32),) if packed else ())
    traced = jax.jit(lambda *a: mosaic_backward.grads_v_from_d(*a, scale=0.1,
                                                               block_v=block_v)).trace(*args)
    assert [(o.shape, o.dtype) for o in jax.tree.leaves(traced.out_info)] == [
        (rv, BF16), (vec, F32), (rc, F32), (rc, F32), (rc, BF16)]
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@needs_plgpu
@pytest.mark.parametrize("packed", [False, True])
def test_dqkw_products_lowers_for_cuda(packed):
    """The state-side gradients fused with the K side's products: dq, dk and the vectors;
    with document ids for packed rows too."""
    B, T, H, K, V, C = 2, 192, 2, 128, 256, 64
    NC = T // C
    S = jax.ShapeDtypeStruct
    rk, rv, rc, vec, st = (B, T, H, K), (B, T, H, V), (B, T, H, C), (B, T, H), (B, NC, H, K, V)
    args = (S(rk, BF16), S(rk, BF16), S(vec, F32), S(st, BF16), S(st, BF16), S(rv, BF16),
            S(rv, BF16), S(rv, BF16), S(rc, BF16), S(rc, BF16), S(rc, BF16), S(vec, F32),
            S(vec, F32)) + ((S((B, T), jnp.int32),) if packed else ())
    traced = jax.jit(lambda *a: mosaic_backward.dqkw_products(*a, scale=0.1)).trace(*args)
    assert [(o.shape, o.dtype) for o in jax.tree.leaves(traced.out_info)] == [
        (rk, BF16), (rk, BF16), (vec, F32), (vec, F32), (vec, F32)]
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@needs_plgpu
def test_fused_local_kernels_check_arguments():
    with pytest.raises(ValueError, match="block_v must be 32 or 64"):
        mosaic_backward.check_grads_v_from_d_supported(V=80, C=64, dtype=BF16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_backward.check_grads_v_from_d_supported(V=256, C=64, dtype=F32)
    with pytest.raises(ValueError, match="block_k=64"):
        mosaic_backward.check_dqkw_products_supported(K=96, V=256, C=64, dtype=BF16)
    with pytest.raises(ValueError, match="shared memory"):
        mosaic_backward.check_dqkw_products_supported(K=128, V=256, C=64, dtype=BF16,
                                                      block_v=128, steps=3)
    z = lambda *s_, dt=BF16: jnp.zeros(s_, dt)  # noqa: E731
    good = [z(1, 64, 1, 64), z(1, 64, 1, 64, dt=F32), z(1, 64, 1, 64), z(1, 64, 1, 64),
            z(1, 64, 1, 64), z(1, 64, 1, dt=F32), z(1, 64, 1, dt=F32)]
    bad = list(good)
    bad[3] = z(1, 64, 1, 32)
    with pytest.raises(ValueError, match="do has shape"):
        mosaic_backward.grads_v_from_d(*bad, scale=0.1)
    bad = list(good)
    bad[6] = z(1, 64, 1)
    with pytest.raises(ValueError, match="beta has dtype bfloat16, expected float32"):
        mosaic_backward.grads_v_from_d(*bad, scale=0.1)


@needs_plgpu
def test_grads_k_products_check_arguments():
    with pytest.raises(ValueError, match="multiple of 64"):
        mosaic_backward.check_products_supported(K=96, C=64, dtype=BF16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_backward.check_products_supported(K=128, C=64, dtype=F32)
    with pytest.raises(ValueError, match="chunk_size=64"):
        mosaic_backward.check_products_supported(K=128, C=32, dtype=BF16)
    z = lambda *s_, dt=BF16: jnp.zeros(s_, dt)  # noqa: E731
    good = [z(1, 64, 1, 128), z(1, 64, 1, 128), z(1, 64, 1, 64, dt=F32), z(1, 64, 1, 128),
            z(1, 64, 1, 64), z(1, 64, 1, 64), z(1, 64, 1, 128, dt=F32),
            z(1, 64, 1, 128, dt=F32), z(1, 64, 1, dt=F32), z(1, 64, 1, dt=F32)]
    bad = list(good)
    bad[4] = z(1, 64, 1, 32)
    with pytest.raises(ValueError, match="M has shape"):
        mosaic_backward.grads_k_products(*bad)
    bad = list(good)
    bad[6] = z(1, 64, 1, 128)
    with pytest.raises(ValueError, match="dq_part has dtype bfloat16, expected float32"):
        mosaic_backward.grads_k_products(*bad)


@needs_plgpu
def test_dqkw_checks_arguments():
    with pytest.raises(ValueError, match="block_k=64"):
        mosaic_backward.check_supported(K=96, V=256, C=64, dtype=BF16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_backward.check_supported(K=128, V=256, C=64, dtype=F32)
    with pytest.raises(ValueError, match="block_v"):
        mosaic_backward.check_supported(K=128, V=80, C=64, dtype=BF16)
    with pytest.raises(ValueError, match="chunk_size=64"):
        mosaic_backward.check_supported(K=128, V=256, C=32, dtype=BF16)
    z = jnp.zeros((1, 64, 1, 128), BF16)
    with pytest.raises(ValueError, match="unpacked rows only"):
        mosaic_backward.chunk_dqkw(z, z, None, None, None, None, None, None,
                                   seg=jnp.zeros((1, 64), jnp.int32), scale=0.1)


@needs_plgpu
@pytest.mark.parametrize("packed,with_t,K,V", [(False, True, 128, 256), (False, False, 128, 256),
                                               (True, True, 128, 256), (False, True, 256, 64)])
def test_local_stage_lowers_for_cuda(packed, with_t, K, V):
    """The forward's local stage on Mosaic GPU (A, T, W, U in one kernel), lowered: with and
    without T for the backward, with document ids for packed rows, at K 256."""
    from qdelta_jax.pallas import mosaic_local

    B, T, H, C = 2, 192, 2, 64
    S = jax.ShapeDtypeStruct
    rk, rv, vec = (B, T, H, K), (B, T, H, V), (B, T, H)
    args = (S(rk, BF16), S(rk, BF16), S(rv, BF16), S(vec, F32), S(vec, BF16),
            S(vec, BF16)) + ((S((B, T), jnp.int32),) if packed else ())
    traced = jax.jit(lambda *a: mosaic_local.chunk_local(
        *a[:6], a[6] if packed else None, with_t=with_t)).trace(*args)
    want = [(rk, BF16), (rv, BF16)] + ([((B, T, H, C), F32)] if with_t else [])
    assert [(o.shape, o.dtype) for o in jax.tree.leaves(traced.out_info)] == want
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@needs_plgpu
def test_local_stage_checks_arguments():
    from qdelta_jax.pallas import mosaic_local

    for kw, match in ((dict(K=96, V=256), "K a multiple of 64"),
                      (dict(K=128, V=80), "V a multiple of 64"),
                      (dict(K=128, V=256, C=32), "chunk_size=64"),
                      (dict(K=128, V=256, dtype=F32), "bfloat16 or float16"),
                      (dict(K=256, V=1152), "shared memory")):
        args = dict(C=64, dtype=BF16) | kw
        with pytest.raises(ValueError, match=match):
            mosaic_local.check_supported(**args)
    # About 97 KB at the 340M layer: two CTAs a multiprocessor.
    assert 2 * mosaic_local.smem_bytes(128, 256, 64, 2, True) < 228 * 1024
    z = lambda *s_, dt=BF16: jnp.zeros(s_, dt)  # noqa: E731
    good = [z(1, 64, 1, 64), z(1, 64, 1, 64), z(1, 64, 1, 64), z(1, 64, 1, dt=F32),
            z(1, 64, 1), z(1, 64, 1)]
    bad = list(good)
    bad[2] = z(1, 64, 1, 64, dt=F32)
    with pytest.raises(ValueError, match="v has dtype float32, expected bfloat16"):
        mosaic_local.chunk_local(*bad)
    bad = list(good)
    bad[4] = z(1, 32, 1)
    with pytest.raises(ValueError, match="beta has shape"):
        mosaic_local.chunk_local(*bad)


@needs_plgpu
def test_repeated_kernels_lower_once():
    """A kernel called from several layers (here under two name scopes) is one jitted
    function: the lowered module holds one copy of its Mosaic GPU module and one kernel hash,
    so jaxlib compiles it once however deep the model (mosaic.call_kernel)."""
    import re

    from qdelta_jax.pallas import mosaic_local

    B, T, H, K, V = 1, 128, 1, 64, 64
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), BF16), S((B, T, H, K), BF16), S((B, T, H, V), BF16),
            S((B, T, H), F32), S((B, T, H), BF16), S((B, T, H), BF16))

    def two_layers(q, k, v, G, beta, lam):
        with jax.named_scope("layer0"):
            w, u, _ = mosaic_local.chunk_local(q, k, v, G, beta, lam)
        with jax.named_scope("layer1"):
            w, u, _ = mosaic_local.chunk_local(w, k, u, G, beta, lam)
        return w, u

    text = jax.jit(two_layers).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@mosaic_gpu_v2") == 1
    assert len(set(re.findall(r'kernel_hash = "((?:[^"\\]|\\.)*)"', text))) == 1
