"""Tests of decoding: the fused one-token kernel (:mod:`qdelta_jax.pallas.decode`, interpret mode
here) against the layer's plain XLA step (``reference.qdelta_step`` after the conv and gate math),
prefill plus fused steps against the full forward, ``generate``'s EOS and top-p semantics, the
``qdelta-generate`` CLI on a tiny trained run, and the bad-input errors."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdelta_jax.layers import QDelta
from qdelta_jax.model import QDeltaConfig, QDeltaLM, _sample, compiled_step, generate
from qdelta_jax.pallas import decode as pallas_decode
from qdelta_jax.testing import rel_err

D = 32
pytestmark = pytest.mark.usefixtures("xla_cache")


def rel(a, b) -> float:
    return rel_err(a, b, ord=np.inf)  # the error of the largest entry, relative to it


def tol(dtype) -> float:
    # float32: summation order only. bfloat16: the output passes the bf16 o, norm and o_proj
    # (each rounding ~2^-9 relative), so a few bf16 ulps of the largest entry.
    return 2e-5 if jnp.dtype(dtype) == jnp.float32 else 3e-2


@nnx.jit
def layer_step(layer, x, cache, mask):
    return layer(x, cache=cache, mask=mask)


LAYERS = {
    "plain": dict(head_dim=16),
    "grouped_neg": dict(head_dim=16, num_v_heads=4, allow_neg_eigval=True),
    "fixed_lam_no_decay_no_conv_no_gate": dict(head_dim=16, fixed_lam=0.3, use_decay=False,
                                               use_short_conv=False, use_gate=False),
    "odd_head_sizes": dict(head_dim=24, expand_v=1.5),
}
CASES = [("plain", "float32"), ("plain", "bfloat16"), ("grouped_neg", "float32"),
         ("grouped_neg", "bfloat16"), ("fixed_lam_no_decay_no_conv_no_gate", "float32"),
         ("odd_head_sizes", "float32")]


def random_cache(layer, B, key):
    """A cache with a random float32 state and random conv histories (compute dtype)."""
    cache = layer.init_cache(B)
    keys = jax.random.split(key, 4)
    return type(cache)(*(None if c is None else
                         (0.5 * jax.random.normal(k, c.shape)).astype(c.dtype)
                         for c, k in zip(cache, keys, strict=True)))


@pytest.mark.parametrize("name,dtype", CASES)
def test_fused_step_equals_xla_step(name, dtype):
    kw = dict(hidden_size=D, num_heads=2, dtype=jnp.dtype(dtype), **LAYERS[name])
    ref = QDelta(**kw, implementation="xla", rngs=nnx.Rngs(0))
    fused = QDelta(**kw, implementation="pallas", rngs=nnx.Rngs(0))
    assert (ref.decode_implementation(), fused.decode_implementation()) == ("xla", "pallas")
    B = 3
    cache = random_cache(ref, B, jax.random.key(2))
    xt = jax.random.normal(jax.random.key(3), (B, 1, D))
    for mask in (jnp.array([[True], [False], [True]]),):
        y_ref, c_ref = layer_step(ref, xt, cache, mask)
        y, c = layer_step(fused, xt, cache, mask)
        assert y.dtype == y_ref.dtype == jnp.dtype(dtype)
        assert rel(y, y_ref) < tol(dtype), name
        assert c.state.dtype == jnp.float32
        # float32 update; in bf16 the kernel's SiLU rounds once where XLA's bf16 SiLU rounds
        # per op, so q, k, v may differ by a bf16 ulp.
        s_tol = 2e-5 if dtype == "float32" else 1e-2
        assert rel(c.state, c_ref.state) < s_tol, name
        for a, b in zip(c[1:], c_ref[1:], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and rel(a, b) < 1e-6
        if mask is not None:  # the masked row is untouched, state and conv caches alike
            for a, b in zip(c, cache, strict=True):
                if a is not None:
                    np.testing.assert_array_equal(a[1], b[1])
            assert rel(c.state[0], cache.state[0]) > 1e-3  # while the others moved


def _cuda_lowering_target():
    """Where lowering Triton kernels for CUDA on a machine without a GPU needs a target GPU
    (jax >= 0.12 reads it from the abstract mesh's device), an H200; older jax needs none."""
    AbstractDevice = getattr(jax.sharding, "AbstractDevice", None)
    if AbstractDevice is None:
        return contextlib.nullcontext()
    device = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_step_lowers_to_one_triton_kernel(dtype):
    """The Triton lowering (no GPU needed to lower): every primitive of the kernel has a rule,
    and a layer's step is a single kernel launch."""
    B, H, HV, K, V, W = 2, 2, 4, 32, 64, 4
    dt = jnp.dtype(dtype)
    z = lambda *s: jnp.zeros(s, dt)  # noqa: E731
    gates = pallas_decode.Gates(0.9, None, True, True)
    w = pallas_decode.LayerWeights(z(W, H * K), z(W, H * K), z(W, HV * V), jnp.zeros(HV),
                                   jnp.zeros(HV))
    conv = (z(B, W - 1, H * K), z(B, W - 1, H * K), z(B, W - 1, HV * V))

    def f(state, conv):
        return pallas_decode.fused_step(
            z(B, H * K), z(B, H * K), z(B, HV * V), z(B, HV), z(B, HV), z(B, HV), state, conv,
            w, jnp.ones((B,), bool), num_heads=H, scale=K**-0.5, gates=gates, interpret=False)

    state = jnp.zeros((B, HV, K, V), jnp.float32)
    with _cuda_lowering_target():
        text = jax.jit(f, donate_argnums=0).trace(state, conv).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1
    assert "qdelta_decode_step" in text


def test_fused_step_bad_input():
    B, H, HV, K, V = 2, 2, 2, 16, 32
    gates = pallas_decode.Gates(0.9, None, False, True)
    w = pallas_decode.LayerWeights(None, None, None, jnp.zeros(HV), jnp.zeros(HV))
    z = lambda *s: jnp.zeros(s)  # noqa: E731
    args = (z(B, H * K), z(B, H * K), z(B, HV * V), z(B, HV), z(B, HV), z(B, HV))
    state = z(B, HV, K, V)
    kw = dict(num_heads=H, scale=0.25, gates=gates)
    with pytest.raises(ValueError, match=r"v must have shape \[B, 64\]"):
        pallas_decode.fused_step(*args[:2], z(B, 3), *args[3:], state, None, w, None, **kw)
    with pytest.raises(TypeError, match="state must be float32"):
        pallas_decode.fused_step(*args, state.astype(jnp.bfloat16), None, w, None, **kw)
    with pytest.raises(ValueError, match="block_v"):
        pallas_decode.fused_step(*args, state, None, w, None, **kw,
                                 config=pallas_decode.DecodeConfig(block_v=24))


# ----------------------------------------------------------------------------- the model


def tiny(**kw) -> QDeltaConfig:
    return QDeltaConfig.from_preset("tiny", **kw)


@pytest.mark.parametrize("dtype,scan", [("float32", False), ("bfloat16", True)])
def test_prefill_and_fused_steps_equal_forward(dtype, scan):
    ref = QDeltaLM(tiny(compute_dtype=dtype, scan_layers=scan), rngs=nnx.Rngs(0))
    fused = QDeltaLM(tiny(compute_dtype=dtype, scan_layers=scan, implementation="pallas"),
                     rngs=nnx.Rngs(0))
    B, T, P = 2, 12, 5
    toks = jax.random.randint(jax.random.key(4), (B, T), 0, 256, jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(ref, toks)
    step = compiled_step(fused)
    # One-token fused steps from the empty cache: every position.
    cache = fused.init_cache(B)
    out = []
    for t in range(T):
        lt, cache = step(toks[:, t : t + 1], cache)
        out.append(lt)
    t_ok = 1e-4 if dtype == "float32" else 5e-2
    assert rel(jnp.concatenate(out, 1), full) < t_ok
    # A prefill (chunked op), then fused steps.
    logits, cache = compiled_step(ref)(toks[:, :P], ref.init_cache(B))
    out = [logits]
    for t in range(P, T):
        lt, cache = step(toks[:, t : t + 1], cache)
        out.append(lt)
    assert rel(jnp.concatenate(out, 1), full) < t_ok


def test_step_bad_cache_and_mask():
    model = nnx.eval_shape(lambda: QDeltaLM(tiny(), rngs=nnx.Rngs(0)))
    toks = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match="holds 3 sequences but tokens has batch size 2"):
        model.step(toks, model.init_cache(3))
    with pytest.raises(ValueError, match="holds 3 sequences"):
        compiled_step(model)(toks, model.init_cache(3))
    with pytest.raises(ValueError, match="mask must have the shape of tokens"):
        model.step(toks, model.init_cache(2), mask=jnp.ones((2, 2), bool))
    scanned = nnx.eval_shape(lambda: QDeltaLM(tiny(scan_layers=True), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="holds 1 sequences"):
        scanned.step(toks, scanned.init_cache(1))


# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def model():
    return QDeltaLM(tiny(), rngs=nnx.Rngs(0))


def test_generate_eos_stops_rows(model):
    prompt = jax.random.randint(jax.random.key(5), (3, 6), 0, 256, jnp.int32)
    N = 8
    free, n_free = generate(model, prompt, N, temperature=0.0, return_lengths=True)
    np.testing.assert_array_equal(n_free, [N] * 3)
    eos = int(free[0, 2])
    out, n = generate(model, prompt, N, temperature=0.0, eos_id=eos, return_lengths=True)
    for b in range(3):
        hits = np.flatnonzero(np.asarray(free[b]) == eos)
        stop = int(hits[0]) + 1 if hits.size else N
        assert int(n[b]) == stop
        # Up to its EOS a row is what it generates without one; after it, EOS fill.
        np.testing.assert_array_equal(out[b, :stop], free[b, :stop])
        assert np.all(np.asarray(out[b, stop:]) == eos)
    assert int(n[0]) <= 3
    # The fused kernel (interpret mode) generates the same tokens.
    fused = QDeltaLM(tiny(implementation="pallas"), rngs=nnx.Rngs(0))
    out_f, n_f = generate(fused, prompt, N, temperature=0.0, eos_id=eos, return_lengths=True)
    np.testing.assert_array_equal(out_f, out)
    np.testing.assert_array_equal(n_f, n)


def test_top_p_semantics():
    probs = jnp.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(probs)[None].repeat(4000, axis=0)
    key = jax.random.key(6)
    draw = lambda p: np.asarray(_sample(logits, key, 1.0, None, p))  # noqa: E731
    # Mass before token i: 0, .5, .8, .95. top_p = 0.7 keeps {0, 1}, renormalised to 5/8, 3/8.
    d = draw(0.7)
    assert set(np.unique(d)) == {0, 1}
    assert abs(np.mean(d == 0) - 0.625) < 0.04
    assert set(np.unique(draw(0.5))) == {0}  # the top token alone holds 0.5
    assert set(np.unique(draw(0.81))) == {0, 1, 2}
    assert set(np.unique(draw(1.0))) == {0, 1, 2, 3}
    # Temperature 0 is argmax and needs no key.
    np.testing.assert_array_equal(_sample(logits[:2], None, 0.0, None, 0.7), [0, 0])


def test_generate_sampling(model):
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    k = jax.random.key(7)
    a = generate(model, prompt, 16, top_p=0.9, rng=k)
    np.testing.assert_array_equal(a, generate(model, prompt, 16, top_p=0.9, rng=k))
    assert not np.array_equal(a, generate(model, prompt, 16, top_p=0.9, rng=jax.random.key(8)))


def test_generate_bad_input(model):
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    g = lambda **kw: generate(model, **{"prompt": prompt, "max_new_tokens": 2,  # noqa: E731
                                        "temperature": 0.0, **kw})
    with pytest.raises(ValueError, match=r"prompt must hold ids in \[0, vocab_size = 256\)"):
        g(prompt=jnp.array([[1, 256]]))
    with pytest.raises(ValueError, match="prompt must hold ids"):
        g(prompt=jnp.array([[-1, 2]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        g(max_new_tokens=-3)
    with pytest.raises(ValueError, match="prompt_lengths"):
        g(prompt_lengths=jnp.array([-1]))
    with pytest.raises(ValueError, match="top_p"):
        g(top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        g(top_p=1.5)
    with pytest.raises(ValueError, match="eos_id"):
        g(eos_id=256)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from qdelta_jax.train import cli

    tmp = tmp_path_factory.mktemp("gen")
    run, data = tmp / "run", tmp / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. Größe, naïve café. " * 20)
    # Byte-level text: a vocabulary of 257 (the bytes and the end-of-document token 256).
    argv = ["--task", "text", "--data", str(data), "--steps", "2", "--batch-size", "4",
            "--seq-len", "32", "--warmup", "1",
            "--eval-every", "0", "--eval-batches", "1", "--save-every", "0", "--no-progress",
            "--run-dir", str(run)]
    assert cli.main(argv) == 0
    return run


def test_cli_streams_what_generate_samples(tiny_run, capsys):
    """The streamed text is generate's tokens for the same prompt and key (sampling with top-p),
    up to the run's end-of-document token 256, decoded as UTF-8."""
    from qdelta_jax.train import generate as gen_cli
    from qdelta_jax.train.params import load_run

    capsys.readouterr()
    rc = gen_cli.main([str(tiny_run), "héllo", "--max-new-tokens", "8", "--temperature", "0.8",
                       "--top-p", "0.9", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    saved = load_run(tiny_run)
    model = saved.model()
    assert saved.step == 2 and model.config.vocab_size >= 257
    prompt = jnp.asarray([list("héllo".encode())], jnp.int32)
    want, n = generate(model, prompt, 8, temperature=0.8, top_p=0.9, rng=jax.random.key(3),
                       eos_id=256, return_lengths=True)
    want = [int(t) for t in want[0, : int(n[0])] if t < 256]
    assert out == bytes(want).decode("utf-8", errors="replace") + "\n"


@pytest.mark.parametrize("argv,flag", [
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--eos-id", "100000"], "--eos-id"),
])
def test_cli_bad_options_exit_2(tiny_run, argv, flag, capsys):
    from qdelta_jax.train import generate as gen_cli

    assert gen_cli.main([str(tiny_run), "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdelta-generate: error:") and flag in err


def test_cli_missing_run_dir(tmp_path, capsys):
    from qdelta_jax.train import generate as gen_cli

    assert gen_cli.main([str(tmp_path / "nope"), "hi"]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_default_decode_path_follows_the_batch(monkeypatch):
    """implementation=None on a GPU: the fused kernel below FUSED_DECODE_MAX_BATCH, XLA's step
    from there on (measured faster there); an explicit "pallas" always takes the kernel."""
    from flax import nnx

    from qdelta_jax import layers

    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    auto = layers.QDelta(32, 2, 16, rngs=nnx.Rngs(0))
    forced = layers.QDelta(32, 2, 16, implementation="pallas", rngs=nnx.Rngs(0))
    n = layers.FUSED_DECODE_MAX_BATCH
    assert auto.decode_implementation(1) == "pallas"
    assert auto.decode_implementation(n) == "xla"
    assert forced.decode_implementation(n) == "pallas"
