"""Autotuning (``qdelta_jax.pallas.tuning``) and the record of tuned configs that
``get_config`` reads (``qdelta_jax.pallas.config.remember``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from qdelta_jax.pallas import config as pcfg
from qdelta_jax.pallas import tuning


def test_remembered_configs_are_found_in_memory_and_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(pcfg, "CACHE_FILE", tmp_path / "tuned.json")
    monkeypatch.setattr(pcfg, "_MEMORY", {})
    base = pcfg.default_config(32, 64, 32, jnp.float32)
    tuned = dataclasses.replace(base, state=pcfg.StageConfig(num_warps=8, block_v=16))
    assert pcfg.get_config(24, 40, 32, jnp.float32) == base
    pcfg.remember(24, 40, 32, jnp.float32, tuned, persist=True)
    assert pcfg.get_config(24, 40, 32, jnp.float32) == tuned
    assert pcfg.get_config(24, 40, 32, jnp.bfloat16) != tuned  # another dtype, another key
    monkeypatch.setattr(pcfg, "_MEMORY", {})  # a new process: read back from the file
    assert pcfg.get_config(24, 40, 32, jnp.float32) == tuned
    monkeypatch.setattr(pcfg, "_MEMORY", {})
    assert pcfg.get_config(24, 40, 32, jnp.float32, use_file=False) == base


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="off the GPU only")
def test_autotune_needs_a_gpu():
    with pytest.raises(RuntimeError, match="GPU"):
        tuning.autotune(32, 32)
