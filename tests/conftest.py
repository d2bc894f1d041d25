"""Shared fixtures."""

import jax
import pytest


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """A persistent compilation cache shared by the training tests of this session: identical
    programs (the same tiny model in many runs) compile once. Uses JAX's private reset so that a
    cache state left by earlier modules does not stick; the old settings come back afterwards.
    Yields the cache folder (subprocess tests pass it on)."""
    from jax._src import compilation_cache as cc

    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    path = str(tmp_path_factory.getbasetemp() / "xla-cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()
