"""Training for qdelta-jax: data (:mod:`.data`), the Optax loop (:mod:`.loop`), sharding
(:mod:`.sharding`), Orbax checkpoints (:mod:`.checkpoint`), the ``qdelta-train`` CLI
(:mod:`.cli`) and ``qdelta-eval`` (:mod:`.evaluate`).

Submodules are imported on use so ``import qdelta_jax.train`` stays cheap.
"""
