"""Nothing silent: token ids are range-checked by the loaders (when a file is opened), by the
model (when tokens are concrete) and by ``generate``; ``--eos-id`` must occur in the data."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdelta_jax.model import QDeltaConfig, QDeltaLM, generate
from qdelta_jax.train import cli
from qdelta_jax.train import data as D


@pytest.fixture(scope="module")
def model():
    cfg = QDeltaConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=1)
    return QDeltaLM(cfg, rngs=nnx.Rngs(0))


def tokens_file(tmp_path, ids, name="t.npy", dtype=np.int32):
    p = tmp_path / name
    ids = np.asarray(ids, dtype)
    if name.endswith(".npy"):
        np.save(p, ids)
    else:
        ids.tofile(p)
    return p


def test_negative_ids_in_npy_are_refused(tmp_path):
    p = tokens_file(tmp_path, [5, 7, -1, 3] * 50)
    with pytest.raises(D.DataError, match=r"must be >= 0, found -1 at position 2"):
        D.load_tokens(p)


def test_huge_id_in_u32_bin_is_refused(tmp_path):
    ids = np.arange(400) % 50
    ids[123] = 3_000_000_000
    p = tokens_file(tmp_path, ids, "t.u32.bin", np.uint32)
    with pytest.raises(D.DataError, match=r"3000000000 at position 123 .*dtype"):
        D.load_tokens(p)


def test_eos_id_must_occur_in_the_data(tmp_path):
    p = tokens_file(tmp_path, np.arange(400) % 50, "t.bin", np.uint16)
    with pytest.raises(D.DataError, match=r"--eos-id 60000 never occurs") as e:
        D.load_tokens(p, eos_id=60000)
    assert e.value.flag == "--eos-id"
    assert D.load_tokens(p, eos_id=49)[2] == 50, "an eos that occurs changes nothing"


def test_eos_id_with_text_is_refused(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello world " * 50)
    with pytest.raises(D.DataError, match="--eos-id applies to .bin/.npy"):
        D.load_tokens(p, eos_id=3)


def test_cli_reports_bad_token_file(tmp_path, capsys):
    p = tokens_file(tmp_path, [5, 7, -1, 3] * 50)
    assert cli.main(["--task", "text", "--data", str(p), "--steps", "1", "--no-progress",
                     "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "must be >= 0" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [64, 1000, -1])
def test_model_refuses_ids_outside_the_vocabulary(model, bad):
    tokens = jnp.zeros((2, 8), jnp.int32).at[1, 5].set(bad)
    with pytest.raises(ValueError, match=rf"tokens must hold ids in \[0, vocab_size = 64\), got "
                                         rf"{bad} at index \[1, 5\]"):
        model(tokens)
    cache = model.init_cache(2)
    with pytest.raises(ValueError, match="tokens must hold ids"):
        model.step(tokens, cache)


def test_generate_refuses_bad_prompts(model):
    prompt = jnp.array([[1, 2, 99]], jnp.int32)
    with pytest.raises(ValueError, match=r"prompt must hold ids in \[0, vocab_size = 64\)"):
        generate(model, prompt, 2)


def test_good_ids_pass(model):
    assert model(jnp.full((1, 4), 63, jnp.int32)).shape == (1, 4, 64)
