"""The Mosaic GPU kernel off the GPU: its checks, and its whole Mosaic GPU lowering for cuda
(register layouts, shared memory transforms, the TMA pipeline), which runs on a CPU-only jax.
Its numerics are checked on the GPU by ``benchmarks/mosaic_dev.py``: Mosaic GPU interpret mode
does not run this kernel (see :mod:`qdelta_jax.pallas.mosaic`)."""

import jax
import jax.numpy as jnp
import pytest

from qdelta_jax.pallas import mosaic

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
])
def test_lowers_for_cuda(cfg):
    f = jax.jit(lambda *a: mosaic.state_output(*a, scale=0.1, cfg=cfg))
    text = f.trace(*_args(1, 128, 2, 128, 256)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("kw, match", [
    (dict(K=128, V=256, C=32, dtype=BF16), "chunk_size=64"),
    (dict(K=96, V=256, C=64, dtype=BF16), "K=96"),
    (dict(K=128, V=256, C=64, dtype=F32), "dtype=float32"),
    (dict(K=128, V=96, C=64, dtype=BF16), "V=96"),
    (dict(K=256, V=256, C=64, dtype=BF16,
          cfg=mosaic.MosaicConfig(block_v=128, max_concurrent_steps=2)), "shared memory"),
])
def test_check_supported_names_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        mosaic.check_supported(**kw)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="block_v"):
        mosaic.MosaicConfig(block_v=32)
    with pytest.raises(ValueError, match="max_concurrent_steps"):
        mosaic.MosaicConfig(max_concurrent_steps=0)
    with pytest.raises(ValueError, match="lowering_semantics"):
        mosaic.MosaicConfig(lowering_semantics="thread")


@needs_plgpu
def test_state_output_checks_shapes():
    q, k, G, W, U, h0 = (jnp.zeros(a.shape, a.dtype) for a in _args(1, 128, 1, 128, 128))
    with pytest.raises(ValueError, match="h0 has shape"):
        mosaic.state_output(q, k, G, W, U, h0[:, :, :64], scale=0.1)
    with pytest.raises(ValueError, match="W has dtype"):
        mosaic.state_output(q, k, G, W.astype(F32), U, h0, scale=0.1)
