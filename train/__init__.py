"""Training for qdelta-jax: data (:mod:`.data`), the Optax loop (:mod:`.loop`), sharding
(:mod:`.sharding`), Orbax checkpoints (:mod:`.checkpoint`), the ``qdelta-train`` CLI
(:mod:`.cli`), ``qdelta-eval`` (:mod:`.evaluate`) and ``qdelta-convert`` (:mod:`.convert`).

``qdelta_jax.train.load_model(run_dir, step=None)`` returns the model of a run directory,
restoring its parameters only (:mod:`.params`).

Submodules are imported on use so ``import qdelta_jax.train`` stays cheap.
"""


def __getattr__(name):
    if name == "load_model":
        from qdelta_jax.train.params import load_model

        return load_model
    raise AttributeError(f"module 'qdelta_jax.train' has no attribute {name!r}")


__all__ = ["load_model"]
