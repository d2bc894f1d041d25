"""Tests of :mod:`qdelta_jax.model`: decoding equals the forward pass, generation with prompts of
different lengths, packed documents, parameter counts, gradients, weight decay mask, config."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qdelta_jax.model import (
    PRESETS,
    QDeltaConfig,
    QDeltaLM,
    count_params,
    generate,
    to_scanned,
    weight_decay_mask,
)
from qdelta_jax.testing import rel_err

TINY = QDeltaConfig.from_preset("tiny")


def rel(a, b) -> float:
    return rel_err(a, b, ord=np.inf)  # the error of the largest entry, relative to it


@pytest.fixture(scope="module")
def model() -> QDeltaLM:
    return QDeltaLM(TINY, rngs=nnx.Rngs(0))


def tokens(B=2, T=24, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, TINY.vocab_size, jnp.int32)


@nnx.jit
def forward(model, toks, cu_seqlens=None):
    return model(toks, cu_seqlens=cu_seqlens)


@nnx.jit
def step(model, toks, cache):
    return model.step(toks, cache)


def n_params(module_or_state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module_or_state,
                                                                         nnx.Param)))


# ----------------------------------------------------------------------------- decoding


def test_prefill_then_steps_give_forward_logits(model):
    toks = tokens()
    full = forward(model, toks)
    assert full.shape == (2, 24, TINY.vocab_size) and full.dtype == jnp.float32
    # Prefill of a prefix (chunked op, crosses a chunk boundary), then one-token steps.
    logits, cache = step(model, toks[:, :17], model.init_cache(2))
    parts = [logits]
    for t in range(17, 24):
        lt, cache = step(model, toks[:, t : t + 1], cache)
        parts.append(lt)
    assert rel(jnp.concatenate(parts, 1), full) < 1e-5
    # One-token steps from the empty cache.
    cache = model.init_cache(2)
    for t in range(4):
        lt, cache = step(model, toks[:, t : t + 1], cache)
        assert rel(lt[:, 0], full[:, t]) < 1e-5


def test_generate_prompts_of_different_lengths(model):
    prompt = tokens(B=3, T=8, seed=2)
    lengths = jnp.array([8, 3, 5])
    out = generate(model, prompt, 6, temperature=0.0, prompt_lengths=lengths)
    assert out.shape == (3, 6) and out.dtype == jnp.int32
    # Row b equals generating it alone ...
    alone = generate(model, prompt[1:2, :3], 6, temperature=0.0)
    np.testing.assert_array_equal(out[1:2], alone)
    # ... and every row is the greedy continuation under the full forward pass.
    for b, n in enumerate(np.asarray(lengths)):
        seq = jnp.concatenate([prompt[b, :n], out[b]])[None]
        greedy = jnp.argmax(forward(model, seq)[0, n - 1 : -1], axis=-1)
        np.testing.assert_array_equal(greedy, out[b])
    # top_k=1 sampling is greedy; sampling is reproducible given the key.
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        generate(model, prompt, 6, top_k=1, rng=key, prompt_lengths=lengths), out)


def test_generate_errors(model):
    prompt = tokens(B=2, T=4)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, prompt, 2, temperature=0.0, prompt_lengths=jnp.array([0, 4]))
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, prompt, 2, temperature=0.0, prompt_lengths=jnp.array([5, 4]))
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompt, 2, temperature=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, 0, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 2, top_k=0, rng=jax.random.key(0))


# ----------------------------------------------------------------------------- training paths


def test_packed_documents_equal_separate_runs(model):
    toks = tokens()
    cu = jnp.array([[0, 10, 24], [0, 24, 24]])
    packed = forward(model, toks, cu)
    # Document 2 of row 0 run alone (at the start of a row; the model is causal, so whatever
    # follows it does not matter); row 1 is one document.
    alone = forward(model, jnp.stack([jnp.concatenate([toks[0, 10:], toks[0, :10]]), toks[1]]))
    assert rel(packed[0, 10:], alone[0, :14]) < 1e-5
    assert rel(packed[1], alone[1]) < 1e-5
    # The first document is a prefix of the unpacked row.
    assert rel(packed[0, :10], forward(model, toks)[0, :10]) < 1e-5
    with pytest.raises(ValueError, match="non-decreasing"):
        model(toks, cu_seqlens=jnp.array([[0, 10, 24], [0, 20, 10]]))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_packed_offsets_are_checked_and_derived_once_per_call(model, monkeypatch, scan):
    """The model turns cu_seqlens into packing.Documents once; its layers, the op, the guard
    and the chunk layouts read that, none checks or derives the offsets again."""
    from qdelta_jax import packing

    calls = {"check_offsets": 0, "doc_ids": 0}

    def counting(name):
        f = getattr(packing, name)

        def counted(*args):
            calls[name] += 1
            return f(*args)

        return counted

    for name in calls:
        monkeypatch.setattr(packing, name, counting(name))
    lm = to_scanned(model) if scan else model
    toks, cu = tokens(), jnp.array([[0, 10, 24], [0, 24, 24]])
    out = jax.eval_shape(lambda: lm(toks, cu_seqlens=cu))
    assert out.shape == (2, 24, TINY.vocab_size)
    assert calls == {"check_offsets": 1, "doc_ids": 1}


def _loss(model, toks):
    logits = model(toks[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()


@nnx.jit
def loss_and_grads(model, toks):
    return nnx.value_and_grad(_loss)(model, toks)


def test_gradients_reach_every_parameter_and_remat_agrees(model):
    toks = tokens(T=20)
    loss, grads = loss_and_grads(model, toks)
    assert np.isfinite(float(loss))
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, g in flat:
        assert float(jnp.max(jnp.abs(g[...]))) > 0, f"zero gradient for {path}"
    remat = QDeltaLM(QDeltaConfig.from_preset("tiny", remat=True), rngs=nnx.Rngs(0))
    loss_r, grads_r = loss_and_grads(remat, toks)
    assert rel(loss_r, loss) < 1e-6
    for (_, a), (_, b) in zip(nnx.to_flat_state(grads_r), flat, strict=True):
        assert rel(a[...], b[...]) < 1e-4


def test_weight_decay_mask(model):
    params = nnx.state(model, nnx.Param)
    mask = weight_decay_mask(params)
    flat = {"/".join(map(str, p)): m.get_value() for p, m in nnx.to_flat_state(mask)}
    no_decay = {p for p, m in flat.items() if not m}
    assert {p.split("/")[-1] for p in no_decay} == {"A_log", "dt_bias", "scale"}
    assert "blocks/0/attn/o_norm/scale" in no_decay and "norm/scale" in no_decay
    assert flat["blocks/1/attn/q_proj/kernel"] and flat["embed/embedding"]
    # As optax's mask: decoupled weight decay moves exactly the masked-in parameters.
    tx = optax.adamw(1e-2, weight_decay=0.5, mask=weight_decay_mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for (path, u), (_, m) in zip(nnx.to_flat_state(updates), nnx.to_flat_state(mask),
                                 strict=True):
        assert bool(jnp.any(u[...] != 0)) == m.get_value(), path
    # Plain dicts (Linen params) work too.
    d = weight_decay_mask({"mixer": {"A_log": jnp.zeros(2),
                                     "q_proj": {"kernel": jnp.ones((2, 2))}}})
    assert d == {"mixer": {"A_log": False, "q_proj": {"kernel": True}}}


def test_return_aux_for_diagnostics(model):
    toks = tokens()
    logits, aux = nnx.jit(lambda m, t: m(t, return_aux=True))(model, toks)
    assert rel(logits, forward(model, toks)) < 1e-6
    assert len(aux) == TINY.num_hidden_layers
    H, K = TINY.num_heads, TINY.head_dim
    assert aux[0]["k"].shape == aux[0]["q"].shape == (2, 24, H, K)
    assert aux[0]["beta"].shape == aux[0]["lam"].shape == (2, 24, H)


def test_bfloat16_compute_with_float32_params(model):
    cfg = QDeltaConfig.from_preset("tiny", compute_dtype="bfloat16")
    m16 = QDeltaLM(cfg, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    toks = tokens()
    logits = forward(m16, toks)
    assert logits.dtype == jnp.float32
    assert rel(logits, forward(model, toks)) < 5e-2


# ----------------------------------------------------------------------------- scan_layers
# The scanned model is built from the unrolled fixture by `to_scanned`, which stacks the
# unrolled blocks' parameters on a leading layer axis: both hold exactly the same parameters.


@pytest.fixture(scope="module")
def scanned(model) -> QDeltaLM:
    s = to_scanned(model)
    assert s.config.scan_layers and not model.config.scan_layers
    return s


def test_scan_layers_logits_equal_unrolled(model, scanned):
    q = nnx.state(scanned.blocks, nnx.Param)["attn"]["q_proj"]["kernel"][...]
    assert q.shape == (TINY.num_hidden_layers, TINY.hidden_size, TINY.num_heads * TINY.head_dim)
    np.testing.assert_array_equal(q[1], model.blocks[1].attn.q_proj.kernel[...])
    toks = tokens()
    full = forward(model, toks)
    assert rel(forward(scanned, toks), full) < 1e-5
    cu = jnp.array([[0, 10, 24], [0, 24, 24]])
    assert rel(forward(scanned, toks, cu), forward(model, toks, cu)) < 1e-5
    # Diagnostics keep their per-layer tuple.
    logits, aux = nnx.jit(lambda m, t: m(t, return_aux=True))(scanned, toks)
    _, aux_u = nnx.jit(lambda m, t: m(t, return_aux=True))(model, toks)
    assert rel(logits, full) < 1e-5 and len(aux) == TINY.num_hidden_layers
    for a, b in zip(aux, aux_u, strict=True):
        assert a.keys() == b.keys() and all(rel(a[k], b[k]) < 1e-5 for k in a)
    with pytest.raises(ValueError, match="already"):
        to_scanned(scanned)
    # Built directly (its own init): same shapes, a working forward pass.
    direct = QDeltaLM(QDeltaConfig.from_preset("tiny", scan_layers=True), rngs=nnx.Rngs(0))
    assert (jax.tree.map(jnp.shape, nnx.state(direct, nnx.Param))
            == jax.tree.map(jnp.shape, nnx.state(scanned, nnx.Param)))
    assert np.all(np.isfinite(forward(direct, toks)))


def test_scan_layers_gradients_and_remat(model, scanned):
    toks = tokens(T=20)
    loss, grads = loss_and_grads(scanned, toks)
    loss_u, grads_u = loss_and_grads(model, toks)
    assert rel(loss, loss_u) < 1e-6
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
    flat_u = dict(nnx.to_flat_state(grads_u))
    for path, g in flat:
        g = g[...]
        if path[0] == "blocks":
            for i in range(TINY.num_hidden_layers):  # every layer's slice gets a gradient
                assert float(jnp.max(jnp.abs(g[i]))) > 0, f"zero gradient for {path}[{i}]"
                assert rel(g[i], flat_u[("blocks", i, *path[1:])][...]) < 1e-4, (path, i)
        else:
            assert float(jnp.max(jnp.abs(g))) > 0, f"zero gradient for {path}"
            assert rel(g, flat_u[path][...]) < 1e-4, path
    remat = to_scanned(QDeltaLM(QDeltaConfig.from_preset("tiny", remat=True), rngs=nnx.Rngs(0)))
    assert remat.config.remat and remat.config.scan_layers
    loss_r, grads_r = loss_and_grads(remat, toks)
    assert rel(loss_r, loss) < 1e-6
    for (_, a), (_, b) in zip(nnx.to_flat_state(grads_r), flat, strict=True):
        assert rel(a[...], b[...]) < 1e-4


def test_scan_layers_decoding(model, scanned):
    toks = tokens()
    full = forward(model, toks)
    cache = scanned.init_cache(2)
    L = TINY.num_hidden_layers
    assert cache.state.shape == (L, 2, TINY.num_heads, TINY.head_dim, TINY.head_dim * 2)
    logits, cache = step(scanned, toks[:, :17], cache)
    parts = [logits]
    for t in range(17, 24):
        lt, cache = step(scanned, toks[:, t : t + 1], cache)
        parts.append(lt)
    assert rel(jnp.concatenate(parts, 1), full) < 1e-5
    # The stacked cache holds the unrolled model's per-layer caches.
    _, cache_u = step(model, toks, model.init_cache(2))
    for i in range(L):
        for a, b in zip(cache, cache_u[i], strict=True):
            assert rel(a[i], b) < 1e-5
    with pytest.raises(ValueError, match="leading"):
        scanned.step(toks, model.init_cache(2))
    prompt, lengths = tokens(B=3, T=8, seed=2), jnp.array([8, 3, 5])
    np.testing.assert_array_equal(
        generate(scanned, prompt, 6, temperature=0.0, prompt_lengths=lengths),
        generate(model, prompt, 6, temperature=0.0, prompt_lengths=lengths))


@pytest.mark.parametrize("kw", [dict(), dict(fixed_lam=0.0, use_decay=False, use_gate=False)])
def test_scan_layers_count_params_and_weight_decay_mask(kw):
    c = QDeltaConfig.from_preset("tiny", scan_layers=True, **kw)
    abstract = nnx.eval_shape(lambda: QDeltaLM(c, rngs=nnx.Rngs(0)))
    assert n_params(abstract) == count_params(c) == formula(c)
    mask = weight_decay_mask(nnx.state(abstract, nnx.Param))
    flat = {"/".join(map(str, p)): m.get_value() for p, m in nnx.to_flat_state(mask)}
    no_decay = {p for p, m in flat.items() if not m}
    want = {"blocks/attn_norm/scale", "blocks/mlp_norm/scale", "blocks/attn/o_norm/scale",
            "norm/scale"} | ({"blocks/attn/A_log", "blocks/attn/dt_bias"} if not kw else set())
    assert no_decay == want
    assert flat["blocks/attn/q_proj/kernel"] and flat["embed/embedding"]


def test_scan_layers_340m_count():
    c = QDeltaConfig.from_preset("340m", scan_layers=True)
    abstract = nnx.eval_shape(lambda: QDeltaLM(c, rngs=nnx.Rngs(0)))
    assert n_params(abstract) == count_params(c)
    assert nnx.state(abstract, nnx.Param)["blocks"]["mlp"]["up_proj"]["kernel"].shape == (
        21, 1024, 2816)


# ----------------------------------------------------------------------------- sizes


def formula(c: QDeltaConfig) -> int:
    """The parameter count written out independently of the model code."""
    D, H, K = c.hidden_size, c.num_heads, c.head_dim
    HV = c.num_v_heads or H
    V = int(K * c.expand_v)
    inter = c.intermediate_size or 256 * -(-int(D * c.hidden_ratio * 2 / 3) // 256)
    proj = D * (2 * H * K + HV * V) + D * HV * V + HV * V * D  # q k v, g, o
    gates = D * HV * (1 + (c.fixed_lam is None) + c.use_decay) + 2 * HV * c.use_decay
    conv = c.conv_size * (2 * H * K + HV * V) * c.use_short_conv
    layer = proj - D * HV * V * (not c.use_gate) + gates + conv + V + 3 * D * inter + 2 * D
    return c.num_hidden_layers * layer + c.vocab_size * D * (2 - c.tie_word_embeddings) + D


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    c = QDeltaConfig.from_preset(name)
    assert count_params(c) == formula(c)
    if name == "340m":
        assert c.mlp_size == 2816
        assert 375e6 < count_params(c) < 385e6  # "340M" counts like the paper's: ~380M
        abstract = nnx.eval_shape(lambda: QDeltaLM(c, rngs=nnx.Rngs(0)))
        assert n_params(abstract) == count_params(c)
    if name == "1b":
        assert 1.3e9 < count_params(c) < 1.45e9


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(num_v_heads=4, use_gate=False), dict(fixed_lam=0.0, use_decay=False),
     dict(tie_word_embeddings=True, use_short_conv=False, intermediate_size=100)],
)
def test_count_params_matches_model(kw):
    c = QDeltaConfig.from_preset("tiny", **kw)
    abstract = nnx.eval_shape(lambda: QDeltaLM(c, rngs=nnx.Rngs(0)))
    assert n_params(abstract) == count_params(c) == formula(c)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field,value",
    [("hidden_size", 0), ("num_heads", 2.5), ("expand_v", 0.3), ("num_v_heads", 3),
     ("chunk_size", 48), ("compute_dtype", "float16"), ("norm_eps", -1.0),
     ("implementation", "cuda"), ("use_gate", 1), ("fixed_lam", float("nan")),
     ("scan_layers", 1), ("save_residuals", 1)],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QDeltaConfig.from_preset("tiny", **{field: value})


def test_presets_and_json(tmp_path):
    with pytest.raises(ValueError, match="340m"):
        QDeltaConfig.from_preset("7b")
    with pytest.raises(ValueError, match="hidden"):
        QDeltaConfig.from_preset("tiny", hidden=3)
    c = QDeltaConfig.from_preset("tiny", fixed_lam=0.5)
    path = tmp_path / "c.json"
    c.to_json(path)
    assert QDeltaConfig.from_json(path) == c
    # The authors' HF config keys.
    hf = {"model_type": "qdelta", "hidden_size": 1024, "num_hidden_layers": 21, "num_heads": 6,
          "head_dim": 128, "expand_v": 2, "lamb_bias": 0.9, "norm_eps": 1e-6,
          "hidden_ratio": 4, "intermediate_size": None, "vocab_size": 32000, "conv_size": 4,
          "use_short_conv": True, "use_gate": True, "allow_neg_eigval": False,
          "tie_word_embeddings": False, "attn": None, "fuse_cross_entropy": True,
          "num_v_heads": None, "mystery_key": 1}
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    with pytest.warns(UserWarning, match="mystery_key"):
        c = QDeltaConfig.from_json(tmp_path / "hf.json")
    assert c == QDeltaConfig.from_preset("340m")
    hf.pop("mystery_key")
    (tmp_path / "bad.json").write_text(json.dumps({**hf, "lamb_bias": "high"}))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="lam_bias"):
        warnings.simplefilter("error")
        QDeltaConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "hybrid.json").write_text(json.dumps({**hf, "attn": {"layers": [1]}}))
    with pytest.raises(ValueError, match="attn"):
        QDeltaConfig.from_json(tmp_path / "hybrid.json")


# ----------------------------------------------------------------------------- module layout

# Every name ``qdelta_jax.model`` has offered (the model lives in modules by job; this module
# gathers them), with the module each one lives in now.
MODEL_NAMES = {
    "qdelta_jax.model_config": ["DTYPES", "NO_DECAY_NAMES", "PRESETS", "QDeltaConfig",
                                "count_params", "derived_intermediate_size",
                                "weight_decay_mask"],
    "qdelta_jax.blocks": ["Block", "SwiGLU"],
    "qdelta_jax.lm": ["ModelCache", "QDeltaLM", "check_token_ids", "compiled_step",
                      "to_scanned"],
    "qdelta_jax.loss": ["LOSS_CHUNK_TOKENS", "chunked_cross_entropy"],
    "qdelta_jax.generation": ["_sample", "generate"],
    "qdelta_jax.layers": ["LayerCache", "QDelta", "RMSNorm", "partitioned"],
}


def test_model_module_keeps_every_name():
    import importlib

    import qdelta_jax
    import qdelta_jax.model as facade

    for module, names in MODEL_NAMES.items():
        home = importlib.import_module(module)
        for name in names:
            assert getattr(facade, name) is getattr(home, name), (module, name)
    for name in ("QDeltaConfig", "QDeltaLM", "generate", "count_params", "weight_decay_mask"):
        assert getattr(qdelta_jax, name) is getattr(facade, name)


# The parameter paths of the tiny preset: checkpoints and HF conversion key on these.
_ATTN = ["A_log", "a_proj/kernel", "b_proj/kernel", "dt_bias", "g_proj/kernel",
         "k_conv1d/kernel", "k_proj/kernel", "lam_proj/kernel", "o_norm/scale", "o_proj/kernel",
         "q_conv1d/kernel", "q_proj/kernel", "v_conv1d/kernel", "v_proj/kernel"]
_BLOCK = ([f"attn/{p}" for p in _ATTN] + ["attn_norm/scale", "mlp/down_proj/kernel",
                                          "mlp/gate_proj/kernel", "mlp/up_proj/kernel",
                                          "mlp_norm/scale"])
_TOP = ["embed/embedding", "lm_head/kernel", "norm/scale"]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_parameter_paths_are_stable(scan):
    config = QDeltaConfig.from_preset("tiny", scan_layers=scan)
    lm = nnx.eval_shape(lambda: QDeltaLM(config, rngs=nnx.Rngs(0)))
    paths = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(lm)))
    blocks = ([f"blocks/{p}" for p in _BLOCK] if scan else
              [f"blocks/{i}/{p}" for i in range(config.num_hidden_layers) for p in _BLOCK])
    assert paths == sorted(blocks + _TOP)
