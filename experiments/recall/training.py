"""Training through :mod:`qdelta_jax.train.loop`: its AdamW, its lr schedule, its masked loss.

Every seed of a variant trains at once: parameters and optimizer states carry a leading seed
axis S and the step is ``jax.vmap``-ed over it. One jitted call (the *train chunk*) runs
``chunk_steps`` optimizer steps in a ``lax.scan``; its shapes are fixed, so it compiles once.

The total number of steps, and with it the cosine schedule, is only known after the first
rounds have been timed (the time budget fixes it), but the train chunk is compiled before them.
So the chunk takes each step's learning rate as an input: :func:`learning_rates` evaluates
``loop.lr_schedule`` on the host for the steps of a round, and the update is ``loop``'s AdamW at
learning rate 1 (:func:`optimizer`) times that rate. The first rounds run in the warm-up, whose
rates do not depend on the total.

The loss is ``loop.ModelFns.loss`` (the model's chunked LM head and cross-entropy) summed over
the masked positions of the batch and divided by their count, as ``loop.make_train_step`` does;
the per-row sums that the per-setting loss curves need come from the same backward pass
(:func:`loss_and_grads`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qdelta_jax.model import QDeltaLM
from qdelta_jax.train import loop


def optimizer(weight_decay: float) -> optax.GradientTransformation:
    """``loop.make_optimizer`` (clip 1.0, AdamW b1 0.9, b2 0.95, eps 1e-15, the project's decay
    mask) at a constant learning rate of 1: the train chunk multiplies the update by the step's
    rate from :func:`learning_rates`."""
    # With no warm-up and a final ratio of 1 the schedule is exactly 1.0 at every step.
    return loop.make_optimizer(loop.OptimConfig(lr=1.0, warmup=0, final_lr_ratio=1.0,
                                                weight_decay=weight_decay))


def learning_rates(prof, total_steps: int, start: int, n: int) -> np.ndarray:
    """``loop.lr_schedule`` (linear warm-up, cosine to 0.1x at ``total_steps - 1``) at steps
    ``start .. start + n - 1``: ``[n] float32``."""
    schedule = loop.lr_schedule(loop.OptimConfig(lr=prof.lr, warmup=prof.warmup,
                                                 steps=int(total_steps)))
    return np.asarray(jax.vmap(schedule)(jnp.arange(start, start + n)), np.float32)


def loss_and_grads(fns: loop.ModelFns, params: Any, batch: dict) -> tuple[Any, Any, Any]:
    """``(loss, row_nll [B], grads)`` of one batch.

    ``loss`` is ``loop``'s masked mean (the nll summed over masked positions over their count),
    ``grads`` its gradient with respect to ``params``, ``row_nll`` the nll summed over each row's
    masked positions. The summed nll is linear in the mask, so its gradient with respect to the
    mask is each position's nll: the per-row sums come out of the backward pass that computes
    ``grads``, without a second forward pass or the ``[B, T, vocab]`` logits.
    """
    mask = batch["mask"].astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(mask), 1.0)

    def loss_fn(params, mask):
        nll, _ = fns.loss(params, {**batch, "mask": mask})
        return nll / denom

    loss, (grads, d_mask) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, mask)
    return loss, jnp.sum(d_mask * mask, axis=-1) * denom, grads


class TrainPrograms:
    """The init and train-chunk programs of one (variant, task), lowered for ``n_seeds`` seeds.

    ``init(keys [S])`` gives ``(params, opt_state)`` with a leading seed axis. ``chunk(params,
    opt_state, batches [S, n, B, T], rates [n])`` runs ``n = prof.chunk_steps`` steps and gives
    the new states (the old ones are donated), the per-step losses ``[S, n]`` and the per-step,
    per-row masked nll sums ``[S, n, B]``.
    """

    def __init__(self, cfg, task, prof, n_seeds: int):
        self.cfg = cfg
        self.fns = loop.ModelFns(lambda: QDeltaLM(cfg, rngs=nnx.Rngs(0)))
        self.n_params = loop.count_params(self.fns.abstract_params)
        tx = optimizer(prof.weight_decay)
        fns = self.fns

        def init_one(key):
            model = QDeltaLM(cfg, rngs=nnx.Rngs(params=key))
            params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
            return params, tx.init(params)

        def chunk_one(params, opt_state, batches, rates):
            def step(carry, xs):
                params, opt_state = carry
                batch, rate = xs
                loss, rows, grads = loss_and_grads(fns, params, batch)
                updates, opt_state = tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, jax.tree.map(lambda u: rate * u, updates))
                return (params, opt_state), (loss, rows)

            (params, opt_state), (loss, rows) = jax.lax.scan(
                step, (params, opt_state), (batches, rates))
            return params, opt_state, loss, rows

        S, n, B, T = n_seeds, prof.chunk_steps, task.B, task.T
        keys = jax.ShapeDtypeStruct((S,), jax.random.key(0).dtype)
        init = jax.jit(jax.vmap(init_one))
        params, opt_state = jax.eval_shape(init, keys)
        batches = {"inputs": jax.ShapeDtypeStruct((S, n, B, T), jnp.int32),
                   "targets": jax.ShapeDtypeStruct((S, n, B, T), jnp.int32),
                   "mask": jax.ShapeDtypeStruct((S, n, B, T), jnp.float32)}
        rates = jax.ShapeDtypeStruct((n,), jnp.float32)
        chunk = jax.jit(jax.vmap(chunk_one, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1))
        self.abstract_params = params
        # Lowering traces Python (the caller's thread); compiling is XLA's (threads in parallel).
        self.lowered = {"init": init.lower(keys),
                        "chunk": chunk.lower(params, opt_state, batches, rates)}
