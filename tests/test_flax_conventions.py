"""The layer as Flax users expect it: the docs/FLAX.md recipe (swapping nnx.MultiHeadAttention)
run as written, partitioning metadata and the trainer's sharding rules on a mesh of host devices,
``dtype=None``, grouped value heads inside the op, and the one-step update's signature."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qdelta_jax import qdelta_rule, qdelta_step
from qdelta_jax.layers import QDelta, qdelta_like
from qdelta_jax.model import QDeltaConfig, QDeltaLM
from qdelta_jax.testing import random_inputs, rel_err, tolerance
from qdelta_jax.train import sharding as shd

ROOT = Path(__file__).resolve().parents[1]
F32, BF16 = jnp.float32, jnp.bfloat16


# ----------------------------------------------------------------------------- the recipe


def test_flax_md_recipe_runs_as_written():
    """Every python block of docs/FLAX.md, in order, as one program: a model built with
    nnx.MultiHeadAttention, swapped for QDelta, trained one step, decoded, its specs read."""
    text = (ROOT / "docs" / "FLAX.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    ns: dict = {}
    exec(compile("\n".join(blocks), "docs/FLAX.md", "exec"), ns)

    model = ns["model"]
    assert ns["replaced"] == [("blocks", 0, "attn"), ("blocks", 1, "attn")]
    assert all(isinstance(b.attn, QDelta) for b in model.blocks)
    assert not any(isinstance(m, nnx.MultiHeadAttention) for _, m in nnx.iter_graph(model))
    before, after = float(ns["loss_before"]), float(ns["loss_after"])
    assert np.isfinite(before) and after < before  # one Adam step on the same batch
    # Decoding: prefill then one step reproduce the full forward.
    full, prefill, last = (np.asarray(ns[n]) for n in ("full", "prefill", "last"))
    np.testing.assert_allclose(prefill, full[:, :11], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last, full[:, 11:], rtol=1e-4, atol=1e-5)
    assert ns["q_spec"] == P("fsdp", None) and ns["a_spec"] == P(None)


def test_qdelta_like_maps_the_arguments():
    attn = nnx.MultiHeadAttention(num_heads=4, in_features=48, qkv_features=32, decode=False,
                                  param_dtype=BF16, rngs=nnx.Rngs(0))
    layer = qdelta_like(attn, rngs=nnx.Rngs(1), expand_v=1.0)
    assert (layer.hidden_size, layer.num_heads, layer.head_dim, layer.head_v_dim) == (48, 4, 8, 8)
    assert layer.dtype is None and layer.param_dtype == BF16
    assert layer.q_proj.kernel[...].dtype == BF16
    wide = nnx.MultiHeadAttention(num_heads=2, in_features=16, out_features=24, decode=False,
                                  rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"out_features \(24\) must equal attn.in_features"):
        qdelta_like(wide, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="nnx.MultiHeadAttention"):
        qdelta_like(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- partitioning

LAYER_OPTIONS = [
    dict(),
    dict(num_v_heads=4, allow_neg_eigval=True),
    dict(use_short_conv=False, use_gate=False),
    dict(fixed_lam=0.0, use_decay=False),
]


@pytest.mark.parametrize("kw", LAYER_OPTIONS)
def test_every_layer_parameter_has_one_name_per_dimension(kw):
    layer = nnx.eval_shape(lambda: QDelta(32, 2, 16, rngs=nnx.Rngs(0), **kw))
    axes = shd.logical_axes(layer)  # raises for a parameter without names
    shapes = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_axes) == len(jax.tree.leaves(shapes))
    for path, names in flat_axes:
        assert all(isinstance(n, str) for n in names), path
    if "num_v_heads" in kw:
        assert axes["A_log"] == ("heads",) and axes["q_proj"]["kernel"] == ("embed", "qk")


@pytest.mark.parametrize("overrides", [dict(), dict(scan_layers=True), dict(
    tie_word_embeddings=True, num_v_heads=4)])
def test_every_model_parameter_has_names(overrides):
    cfg = QDeltaConfig.from_preset("tiny", **overrides)
    model = nnx.eval_shape(lambda: QDeltaLM(cfg, rngs=nnx.Rngs(0)))
    axes = shd.logical_axes(model)
    if cfg.scan_layers:
        assert axes["blocks"]["attn"]["A_log"] == ("layers", "heads")
        assert axes["blocks"]["mlp"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
    else:
        assert axes["embed"]["embedding"] == ("vocab", "embed")
        assert axes["blocks"][1]["attn_norm"]["scale"] == ("norm",)


def test_missing_names_are_refused():
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((3, 4)))

    with pytest.raises(ValueError, match=r"parameter w of shape \[3, 4\] has no logical axis"):
        shd.logical_axes(Bare())


def test_parameter_tree_is_unchanged_by_the_metadata():
    """Checkpoints hold the pure parameter tree: names and shapes must be those of the layout
    before the metadata existed (the table below), so old checkpoints still load."""
    layer = QDelta(32, 2, 16, num_v_heads=4, rngs=nnx.Rngs(0))
    want = {
        ("A_log",): (4,), ("dt_bias",): (4,), ("a_proj", "kernel"): (32, 4),
        ("b_proj", "kernel"): (32, 4), ("lam_proj", "kernel"): (32, 4),
        ("q_proj", "kernel"): (32, 32), ("k_proj", "kernel"): (32, 32),
        ("v_proj", "kernel"): (32, 128), ("g_proj", "kernel"): (32, 128),
        ("q_conv1d", "kernel"): (4, 32), ("k_conv1d", "kernel"): (4, 32),
        ("v_conv1d", "kernel"): (4, 128), ("o_norm", "scale"): (32,),
        ("o_proj", "kernel"): (128, 32),
    }
    pure = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    got = {tuple(k.key for k in path): x.shape
           for path, x in jax.tree_util.tree_leaves_with_path(pure)}
    assert got == want
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(pure))
    # A plain tree of arrays (as a checkpoint restores it) loads back, the metadata kept.
    state = nnx.state(layer, nnx.Param)
    plain = jax.tree.map(lambda x: np.asarray(x) + 1.0, pure)
    nnx.replace_by_pure_dict(state, plain)
    nnx.update(layer, state)
    np.testing.assert_array_equal(layer.A_log[...], plain["A_log"])
    assert shd.logical_axes(layer)["A_log"] == ("heads",)


@pytest.mark.parametrize("names,shape,want", [
    (("embed", "qk"), (64, 64), P("fsdp", None)),
    (("v", "embed"), (256, 64), P("fsdp", None)),
    (("conv", "v"), (4, 256), P(None, "fsdp")),
    (("heads",), (2,), P(None)),  # A_log: never split, whatever divides it
    (("norm",), (64,), P(None)),
    (("vocab", "embed"), (250, 64), P(None, "fsdp")),  # vocab not divisible: embed takes it
    (("embed", "vocab"), (6, 256), P(None, "fsdp")),
    (("layers", "embed", "mlp"), (2, 64, 256), P(None, "fsdp", None)),
    ((), (), P()),
])
def test_logical_spec_rules(names, shape, want):
    assert shd.logical_spec(names, shape, {"data": 2, "fsdp": 4}) == want
    assert shd.logical_spec(names, shape, {"data": 8, "fsdp": 1}) == P(*[None] * len(shape))


def test_logical_spec_errors():
    with pytest.raises(ValueError, match="logical axis 'experts' has no sharding rule"):
        shd.logical_spec(("experts",), (8,), {"data": 1, "fsdp": 2})
    with pytest.raises(ValueError, match="the mesh has no axis 'tensor'"):
        shd.logical_spec(("embed",), (8,), {"fsdp": 2}, rules=(("embed", "tensor"),))


_MESH_SCRIPT = r"""
import json, jax
from qdelta_jax.model import QDeltaConfig
from qdelta_jax.train import sharding as shd, trainer

out = {}
for name, over in (("unrolled", {}), ("scanned", {"scan_layers": True})):
    cfg = QDeltaConfig.from_preset("tiny", num_hidden_layers=1, vocab_size=250, num_v_heads=4,
                                   **over)
    sess = trainer.Session(trainer.TrainArgs(batch_size=8, seq_len=32), cfg,
                           shd.make_mesh("data=2,fsdp=4"))
    state = sess.init_state()
    rows = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        key = jax.tree_util.keystr(path)
        spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
        rows[key] = [spec, list(x.addressable_shards[0].data.shape)]
    out[name] = rows
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_layout():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    p = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.split("RESULT", 1)[1])


# Tiny preset, one layer, vocab 250, HV = 4 value heads: D 64, H K 64, HV V 256, MLP 256; the mesh
# data=2 x fsdp=4. Per parameter: its PartitionSpec and the shape of one device's shard.
EXPECTED = {
    "['embed']['embedding']": ([None, "fsdp"], [250, 16]),  # 250 % 4 != 0: D is split
    "['lm_head']['kernel']": (["fsdp", None], [16, 250]),
    "['norm']['scale']": ([None], [64]),
    "['blocks'][0]['attn_norm']['scale']": ([None], [64]),
    "['blocks'][0]['mlp_norm']['scale']": ([None], [64]),
    "['blocks'][0]['mlp']['gate_proj']['kernel']": (["fsdp", None], [16, 256]),
    "['blocks'][0]['mlp']['up_proj']['kernel']": (["fsdp", None], [16, 256]),
    "['blocks'][0]['mlp']['down_proj']['kernel']": (["fsdp", None], [64, 64]),
    "['blocks'][0]['attn']['q_proj']['kernel']": (["fsdp", None], [16, 64]),
    "['blocks'][0]['attn']['k_proj']['kernel']": (["fsdp", None], [16, 64]),
    "['blocks'][0]['attn']['v_proj']['kernel']": (["fsdp", None], [16, 256]),
    "['blocks'][0]['attn']['g_proj']['kernel']": (["fsdp", None], [16, 256]),
    "['blocks'][0]['attn']['b_proj']['kernel']": (["fsdp", None], [16, 4]),
    "['blocks'][0]['attn']['lam_proj']['kernel']": (["fsdp", None], [16, 4]),
    "['blocks'][0]['attn']['a_proj']['kernel']": (["fsdp", None], [16, 4]),
    "['blocks'][0]['attn']['A_log']": ([None], [4]),  # the shape rule split these
    "['blocks'][0]['attn']['dt_bias']": ([None], [4]),
    "['blocks'][0]['attn']['q_conv1d']['kernel']": ([None, "fsdp"], [4, 16]),
    "['blocks'][0]['attn']['k_conv1d']['kernel']": ([None, "fsdp"], [4, 16]),
    "['blocks'][0]['attn']['v_conv1d']['kernel']": ([None, "fsdp"], [4, 64]),
    "['blocks'][0]['attn']['o_norm']['scale']": ([None], [64]),
    "['blocks'][0]['attn']['o_proj']['kernel']": (["fsdp", None], [64, 64]),
}


def test_trainer_lays_parameters_out_by_their_names(mesh_layout):
    rows = mesh_layout["unrolled"]
    params = {k[len(".params"):]: v for k, v in rows.items() if k.startswith(".params")}
    assert {k: tuple(v) for k, v in params.items()} == EXPECTED
    # Adam's moments follow their parameter; counters, the step and the RNG are replicated.
    moments = 0
    for key, (spec, shard) in rows.items():
        m = re.match(r"\.opt_state.*\.(mu|nu)(\[.*)", key)
        if m:
            assert (spec, shard) == EXPECTED[m.group(2)], key
            moments += 1
        elif not key.startswith(".params"):
            assert not any(spec), key
    assert moments == 2 * len(EXPECTED)


def test_trainer_layout_with_stacked_layers(mesh_layout):
    params = {k[len(".params['blocks']"):]: v for k, v in mesh_layout["scanned"].items()
              if k.startswith(".params['blocks']")}
    for key, (spec, shard) in EXPECTED.items():
        if not key.startswith("['blocks'][0]"):
            continue
        got_spec, got_shard = params[key[len("['blocks'][0]"):]]
        assert got_spec == [None, *spec] and got_shard == [1, *shard], key


# ----------------------------------------------------------------------------- dtype=None


@nnx.jit
def _apply(layer, x):
    return layer(x)


def _assert_no_warning_of_ours(caught) -> None:
    """No warning at all (such as "float64 requested in astype ... truncated") except the
    deprecation notices some flax/jax pairs print about each other's APIs."""
    ours = [w for w in caught if not issubclass(w.category, DeprecationWarning)
            or "qdelta_jax" in str(w.filename)]
    assert not ours, [f"{w.category.__name__}: {w.message} ({w.filename})" for w in ours]


@pytest.mark.parametrize("param_dtype,x_dtype", [(F32, F32), (F32, BF16), (BF16, BF16),
                                                 (BF16, F32)])
def test_dtype_none_follows_the_inputs_as_flax_does(param_dtype, x_dtype):
    x = jax.random.normal(jax.random.key(1), (2, 20, 32), F32).astype(x_dtype)
    flax_dtype = nnx.Linear(32, 32, param_dtype=param_dtype, rngs=nnx.Rngs(0))(x).dtype
    layer = QDelta(32, 2, 16, dtype=None, param_dtype=param_dtype, chunk_size=16,
                   rngs=nnx.Rngs(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = _apply(layer, x)
    _assert_no_warning_of_ours(caught)
    assert y.dtype == flax_dtype
    explicit = QDelta(32, 2, 16, dtype=flax_dtype, param_dtype=param_dtype, chunk_size=16,
                      rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(_apply(explicit, x), np.float32))


def test_dtype_none_decoding_keeps_the_cache_dtype():
    layer = QDelta(32, 2, 16, dtype=None, param_dtype=BF16, chunk_size=16, rngs=nnx.Rngs(0))
    cache = layer.init_cache(2)
    assert cache.conv_q.dtype == BF16 and cache.state.dtype == F32
    x = jax.random.normal(jax.random.key(2), (2, 1, 32), F32)  # float32 inputs: float32 compute
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, new = layer(x, cache=cache)
    _assert_no_warning_of_ours(caught)
    assert y.dtype == F32
    assert jax.tree.map(lambda a: a.dtype, new) == jax.tree.map(lambda a: a.dtype, cache)


# ----------------------------------------------------------------------------- grouped heads

B, T, H, G, K, V = 1, 20, 2, 2, 8, 12  # HV = H * G value heads


def _grouped_inputs(dtype):
    q, k, *_ = random_inputs(jax.random.key(7), B, T, H, K, V, dtype=dtype)
    _, _, v, g, beta, lam, h0 = random_inputs(jax.random.key(8), B, T, H * G, K, V, dtype=dtype)
    w = jax.random.normal(jax.random.key(9), (B, T, H * G, V), F32)
    return (q, k, v, g, beta, lam, h0), w


def _loss(impl):
    def loss(q, k, v, g, beta, lam, h0, w):
        o, fin = qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, output_final_state=True,
                             chunk_size=16, implementation=impl)
        return jnp.sum(o.astype(F32) * w) + jnp.sum(fin * jnp.cos(h0)), (o, fin)

    return jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)


@jax.jit
def _oracle(q, k, v, g, beta, lam, h0, w):
    """The reference with q, k given per value head (repeated outside the op); their gradients
    summed over each group by hand, not by autodiff through a repeat."""
    qr, kr = jnp.repeat(q, G, axis=2), jnp.repeat(k, G, axis=2)
    out, grads = _loss("reference")(qr, kr, v, g, beta, lam, h0, w)
    dq, dk = (d.reshape(B, T, H, G, K).sum(3) for d in grads[:2])
    return out, (dq, dk, *grads[2:])


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_grouped_value_heads_match_the_reference_with_repeated_qk(impl, dtype):
    args, w = _grouped_inputs(dtype)
    (_, (o, fin)), grads = jax.jit(_loss(impl))(*args, w)
    (_, (o_r, fin_r)), grads_r = _oracle(*args, w)  # the same rounded inputs
    assert o.shape == (B, T, H * G, V) and o.dtype == dtype and fin.shape == (B, H * G, K, V)
    assert grads[0].shape == (B, T, H, K) and grads[0].dtype == dtype
    tol = 1e-6 if impl == "reference" and dtype == F32 else tolerance(dtype, T)
    errs = {"o": rel_err(o, o_r), "final": rel_err(fin, fin_r)}
    for name, a, b in zip(("q", "k", "v", "g", "beta", "lam", "h0"), grads, grads_r):
        assert a.shape == b.shape, name
        errs["d" + name] = rel_err(a, b)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"above {tol:.2e}: {bad} (all: {errs})"


def test_grouped_heads_bad_count_is_a_clear_error():
    (q, k, v, g, beta, lam, _), _ = _grouped_inputs(F32)
    q3 = jnp.concatenate([q, q[:, :, :1]], axis=2)  # H = 3 does not divide HV = 4
    with pytest.raises(ValueError, match=r"v has HV = 4 value heads, which must be a multiple "
                                         r"of the H = 3 heads of q and k"):
        qdelta_rule(q3, q3, v, g, beta, lam)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, HV\] = \[1, 20, 4\]"):
        qdelta_rule(q, k, v, g[:, :, :2], beta, lam)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, HV, K, V\]"):
        qdelta_rule(q, k, v, g, beta, lam, initial_state=jnp.zeros((1, 2, K, V)))


def test_layer_passes_grouped_heads_to_the_op(monkeypatch):
    """The layer hands the op H query/key heads (no repeat of its own) and gets what the
    reference computes from repeated ones."""
    from qdelta_jax import ops

    seen = []
    real = ops.qdelta_rule

    def spy(q, k, v, *a, **kw):
        seen.append((q.shape[2], v.shape[2]))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(ops, "qdelta_rule", spy)
    layer = QDelta(32, 2, 16, num_v_heads=4, implementation="reference", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 6, 32), F32)
    y, aux = layer(x, return_aux=True)
    assert seen == [(2, 4)]
    # Diagnostics still see q, k per value head.
    assert aux["q"].shape == (1, 6, 4, 16)
    np.testing.assert_array_equal(aux["q"][:, :, 0], aux["q"][:, :, 1])
    assert np.all(np.isfinite(np.asarray(y)))


# ----------------------------------------------------------------------------- one step


def test_step_takes_the_ops_order_and_returns_o_first():
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.key(5), 2, 1, 3, 8, 6)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    o, final = qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, output_final_state=True,
                           normalize_qk=False, implementation="reference", scale=0.5)
    o1, s1 = qdelta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lam[:, 0], scale=0.5,
                         state=h0)
    assert o1.shape == (2, 3, 6) and s1.shape == (2, 3, 8, 6)
    np.testing.assert_allclose(o1, o[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s1, final, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError):  # state and scale are keyword-only
        qdelta_step(h0, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lam[:, 0], 0.5)
