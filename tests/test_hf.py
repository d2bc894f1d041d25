"""Tests of :mod:`qdelta_jax.hf` (the authors' HF folders in and out), ``qdelta-convert``
(:mod:`qdelta_jax.train.convert`), ``qdelta-train --init-from`` and
:func:`qdelta_jax.train.load_model`, on two tiny models made with the authors' code
(``tests/fixtures/authors_hf/``, README there)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from qdelta_jax import hf, reference
from qdelta_jax.model import QDeltaConfig, QDeltaLM
from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train import cli, convert, load_model

FIXTURES = Path(__file__).parent / "fixtures" / "authors_hf"
NAMES = ("tiny", "tiny_grouped_negeig")

# Measured on these fixtures (README): the authors' shipped model (their chunk kernel) against
# the exact function of the same weights, relative Frobenius error of the logits.
AUTHORS_DIFF = {"tiny": 5.6e-2, "tiny_grouped_negeig": 6.1e-1}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.cache
def io(name):
    with np.load(FIXTURES / name / "io.npz") as f:
        return {k: f[k] for k in f}


_forward = nnx.jit(lambda m, t: m(t))


def logits(model, ids, *, fresh: bool = False):
    """The model's logits, compiled (``fresh``: a new jit, so no trace cached under another
    l2 eps is reused)."""
    fn = nnx.jit(lambda m, t: m(t)) if fresh else _forward
    return np.asarray(fn(model, jnp.asarray(ids, jnp.int32)))


@pytest.fixture
def no_l2_eps(monkeypatch):
    """q, k normalised as ``x / |x|``: the fixtures' exact loop has no eps there, while fla's
    kernel and this code add 1e-6 inside the square root (see the fixture README)."""
    monkeypatch.setattr(reference, "l2_normalize",
                        functools.partial(reference.l2_normalize, eps=0.0))


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("name", NAMES)
def test_from_hf_logits_equal_the_exact_function(name, no_l2_eps):
    model = hf.from_hf(FIXTURES / name)
    out = logits(model, io(name)["input_ids"], fresh=True)
    # float32 end to end against a float64 loop: measured 5e-7 (tiny), 8e-7 (grouped).
    assert rel(out, io(name)["logits_exact"]) < 3e-6
    # The authors' kernel computes another function of the same weights (README).
    assert rel(out, io(name)["logits_authors"]) == pytest.approx(AUTHORS_DIFF[name], rel=0.05)


def test_the_l2_eps_is_the_only_difference_left():
    # With the 1e-6 of fla's l2norm (this code's default) the logits move by what that eps does
    # to the tiny |q|^2 of random weights: 5e-4 here, 1.8e-3 with grouped heads.
    name = "tiny"
    out = logits(hf.from_hf(FIXTURES / name), io(name)["input_ids"], fresh=True)
    assert 1e-4 < rel(out, io(name)["logits_exact"]) < 1e-3


def test_bfloat16_compute_and_bad_dtypes():
    model = hf.from_hf(FIXTURES / "tiny", dtype="bfloat16")
    assert model.config.compute_dtype == "bfloat16" and model.config.param_dtype == "float32"
    out = logits(model, io("tiny")["input_ids"], fresh=True)
    # bfloat16 activations (8 bits of mantissa) through two layers: about 1e-2.
    assert rel(out, io("tiny")["logits_exact"]) < 3e-2
    for kw in (dict(dtype="float16"), dict(param_dtype="int8")):
        with pytest.raises(ValueError, match=next(iter(kw))):
            hf.from_hf(FIXTURES / "tiny", **kw)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", NAMES)
def test_to_hf_reproduces_every_tensor_and_config_key(name, tmp_path):
    src = FIXTURES / name
    _, meta = hf.read_hf_config(src)
    model = hf.from_hf(src)
    hf.to_hf(model, tmp_path / "a", extra_config=meta)
    want, got = load_file(str(src / "model.safetensors")), load_file(
        str(tmp_path / "a" / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    original = json.loads((src / "config.json").read_text())
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == original
    # Without the metadata: the authors' defaults, every key but the transformers version.
    hf.to_hf(model, tmp_path / "b")
    plain = json.loads((tmp_path / "b" / "config.json").read_text())
    assert set(plain) == set(original) - {"transformers_version"}
    assert all(plain[k] == original[k] for k in plain)


def test_sharded_folders_and_bfloat16(tmp_path):
    model = hf.from_hf(FIXTURES / "tiny", param_dtype="bfloat16")
    out = hf.to_hf(model, tmp_path / "s", max_shard_size=600_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / hf.WEIGHTS_FILE).exists()
    assert all((out / s).is_file() for s in shards)
    tensors = hf.read_hf_tensors(out)
    assert {a.dtype.name for a in tensors.values()} == {"bfloat16"}
    back = hf.from_hf(out)  # the stored dtype is kept
    assert back.config.param_dtype == "bfloat16"
    for k, a in hf.hf_tensors(back).items():
        np.testing.assert_array_equal(a.view(np.uint16), tensors[k].view(np.uint16), err_msg=k)
    # The float32 originals rounded once to bfloat16.
    ref = load_file(str(FIXTURES / "tiny" / "model.safetensors"))
    np.testing.assert_array_equal(tensors["lm_head.weight"].astype(np.float32),
                                  ref["lm_head.weight"].astype(tensors["lm_head.weight"].dtype)
                                  .astype(np.float32))
    # Overwriting with one file removes the shards it replaces; refusing keeps them.
    with pytest.raises(FileExistsError, match="overwrite"):
        hf.to_hf(back, out)
    hf.to_hf(back, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("overrides, absent", [
    (dict(use_gate=False), "attn.g_proj.weight"),
    (dict(use_short_conv=False), "attn.q_conv1d.weight"),
    (dict(tie_word_embeddings=True, num_v_heads=4, intermediate_size=96, conv_size=3,
          expand_v=1.5, allow_neg_eigval=True, lam_bias=0.3, norm_eps=1e-5), "lm_head.weight"),
])
def test_config_options_are_honoured(overrides, absent, tmp_path):
    c = QDeltaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=2,
                     head_dim=16, **overrides)
    model = _random_model(c)
    out = hf.to_hf(model, tmp_path / "m")
    names = set(load_file(str(out / "model.safetensors")))
    assert not any(n.endswith(absent) for n in names)
    cfg = json.loads((out / "config.json").read_text())
    theirs = {"lam_bias": "lamb_bias"}
    for k, v in overrides.items():
        assert cfg[theirs.get(k, k)] == v
    back = hf.from_hf(out)
    assert back.config == c
    ids = np.arange(40).reshape(2, 20) % 96
    want = logits(model, ids)
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(logits(back, ids), want)


def _random_model(config, seed=0):
    """A model of ``config`` with random parameters drawn in NumPy (norm weights and gates
    away from their initial values, so a wrong name or layout shows in the logits); much
    faster than the model's own initialisation op by op."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: QDeltaLM(config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
                          nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def test_scanned_models_write_the_same_tensors(tmp_path):
    from qdelta_jax.model import to_scanned

    model = hf.from_hf(FIXTURES / "tiny")
    a, b = hf.hf_tensors(model), hf.hf_tensors(to_scanned(model))
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- bad input


def _copy(tmp_path, name="tiny", config=None, tensors=None) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    t = load_file(str(FIXTURES / name / "model.safetensors"))
    save_file(tensors(t) if tensors else t, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("edit, msg", [
    (lambda c: {**c, "rope_theta": 1e4}, "'rope_theta'"),
    (lambda c: {**c, "model_type": "gated_deltanet"}, "'model_type'"),
    (lambda c: {**c, "attn": {"layers": [1], "num_heads": 2}}, "'attn'"),
    (lambda c: {**c, "hidden_act": "gelu"}, "'hidden_act'"),
    (lambda c: {**c, "attn_mode": "fused_chunk"}, "'attn_mode'"),
    (lambda c: {**c, "lamb_bias": "high"}, "'lamb_bias'"),
    (lambda c: {**c, "num_v_heads": 3}, "num_v_heads"),
    (lambda c: {**c, "use_gate": "yes"}, "use_gate"),
    (lambda c: {k: v for k, v in c.items() if k != "head_dim"}, "head_dim"),
])
def test_config_keys_refused_by_name(edit, msg, tmp_path):
    d = _copy(tmp_path, config=edit)
    with pytest.raises(ValueError, match=msg) as e:
        hf.from_hf(d)
    assert str(d / "config.json") in str(e.value)


@pytest.mark.parametrize("edit, msg", [
    (lambda t: {k: v for k, v in t.items() if "layers.1.attn.A_log" not in k},
     "lack 1 tensors.*model.layers.1.attn.A_log"),
    (lambda t: {**t, "model.layers.0.attn.q_conv1d.bias": np.zeros(64, np.float32)},
     "q_conv1d.bias"),
    (lambda t: {**t, "model.layers.0.attn.k_conv1d.weight": np.zeros((64, 4), np.float32)},
     r"k_conv1d.weight has shape \[64, 4\], expected \[64, 1, 4\]"),
])
def test_bad_tensors_named(edit, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        hf.from_hf(_copy(tmp_path, tensors=edit))


def test_tied_embeddings_must_match(tmp_path):
    d = _copy(tmp_path, config=lambda c: {**c, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf.from_hf(d)


def test_missing_files_and_packages(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hf.from_hf(tmp_path / "nothing")
    d = tmp_path / "torch"
    d.mkdir()
    (d / "config.json").write_text((FIXTURES / "tiny" / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        hf.from_hf(d)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"qdelta-jax\[hf\]"):
        hf.from_hf(FIXTURES / "tiny")


def test_to_hf_refuses_what_the_authors_model_cannot_hold(tmp_path):
    c = QDeltaConfig.from_preset("tiny", fixed_lam=0.5, num_hidden_layers=1)
    with pytest.raises(ValueError, match="fixed_lam"):
        hf.to_hf(_random_model(c), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="hidden_size"):
        hf.config_to_hf(QDeltaConfig.from_preset("tiny"), {"hidden_size": 3})


# ----------------------------------------------------------------------------- CLI and runs


def test_convert_cli_errors(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    for argv, msg in [
        (["from-hf", str(FIXTURES / "tiny"), str(tmp_path / "full")], "not an empty folder"),
        (["from-hf", str(tmp_path / "none"), str(tmp_path / "o")], "no such file"),
        (["to-hf", str(FIXTURES / "tiny"), str(tmp_path / "o")], "not a qdelta-train run"),
    ]:
        assert convert.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("qdelta-convert: error:") and msg in err, err
        assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "full" / "x").read_text() == "keep"
    assert convert.parse_size("5GB") == 5 * 10**9 and convert.parse_size("2MiB") == 2**21


@pytest.mark.usefixtures("xla_cache")
def test_hf_to_fine_tuning_to_hf(tmp_path, capsys):
    """The flow of a user: an authors' HF folder -> qdelta-train --init-from on text -> an HF
    folder that loads back to the fine-tuned model's logits."""
    params_dir, run, out = tmp_path / "params", tmp_path / "run", tmp_path / "hf"
    assert convert.main(["from-hf", str(FIXTURES / "tiny"), str(params_dir)]) == 0
    original = hf.from_hf(FIXTURES / "tiny")
    start = load_model(params_dir)
    ids = io("tiny")["input_ids"][:, :48]
    np.testing.assert_array_equal(logits(start, ids), logits(original, ids))

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    argv = ["--init-from", str(params_dir), "--task", "text", "--data", str(text),
            "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-3",
            "--warmup", "0", "--save-every", "0", "--eval-every", "0", "--eval-batches", "1",
            "--run-dir", str(run), "--no-progress"]
    assert cli.main(argv + ["--stop-after", "1"]) == 0
    assert "initialised from" in capsys.readouterr().out
    # Resuming needs only the run directory, not the folder it started from.
    params_dir.rename(tmp_path / "moved")
    assert cli.main(["--run-dir", str(run), "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out
    (tmp_path / "moved").rename(params_dir)
    tuned = load_model(run)
    assert tuned.config == start.config
    assert rel(logits(tuned, ids), logits(start, ids)) > 1e-6  # it trained

    assert convert.main(["to-hf", str(run), str(out)]) == 0
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (FIXTURES / "tiny" / "config.json").read_text())  # metadata carried through the run
    np.testing.assert_array_equal(logits(hf.from_hf(out), ids), logits(tuned, ids))
    # Nothing is overwritten without asking.
    assert convert.main(["to-hf", str(run), str(out), "--step", "2"]) == 2
    assert "overwrite" in capsys.readouterr().err
    with pytest.raises(ckpt.RunDirError, match="step 5: no such checkpoint"):
        load_model(run, step=5)
    # A model that does not fit the data's ids, or other sizes, is refused by name.
    assert cli.main(argv[:-3] + ["--run-dir", str(tmp_path / "r2"), "--model-overrides",
                                 "hidden_size=64", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--init-from" in err and "hidden_size" in err


def test_restore_params_reads_only_the_parameters_and_checks_them(tmp_path):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k[0], (8, 16)), "blocks": {0: {"b": jnp.ones((16,))}}}
    opt = {"m": jax.random.normal(k[1], (8, 16))}
    c = ckpt.Checkpointer(tmp_path, async_save=False)
    for step in (1, 2):
        bumped = jax.tree.map(lambda a, s=step: a + s, params)
        c.save(step, {"params": bumped, "opt": opt}, {"index": step})
    c.close()
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        params)
    r = ckpt.Checkpointer(tmp_path, read_only=True)
    step, got = r.restore_params(like)
    assert step == 2 and set(got) == {"w", "blocks"}
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(params["w"]) + 2)
    # A checksum that does not match: skipped with a warning (nothing moved), or refused.
    meta = tmp_path / "checkpoints" / "2" / ckpt.INTEGRITY / "metadata"
    saved = json.loads(meta.read_text())
    saved["checksums"]["params.w"] = "0" * 16
    meta.write_text(json.dumps(saved))
    with pytest.warns(ckpt.CheckpointFallbackWarning, match="do not match the checksums"):
        assert r.restore_params(like)[0] == 1
    assert (tmp_path / "checkpoints" / "2").is_dir()
    with pytest.raises(ckpt.RunDirError, match="cannot be used"):
        r.restore_params(like, 2)
    other = {**like, "w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
    with pytest.raises(ckpt.RunDirError, match="another model"):
        r.restore_params(other, 1)
    r.close()
