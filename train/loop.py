"""The pure-functional training loop: the train state, the optimizer, the jitted steps.

The NNX model is split once into a static graph definition and its parameters. The parameters
travel through ``jax.jit`` as a plain nested dict (``nnx.to_pure_dict``) so that Optax, Orbax and
the sharding rules all see an ordinary pytree; :class:`ModelFns` merges them back into a model
inside the traced step.

``train_step(state, batch) -> (state, metrics)`` is pure. It

* computes the masked next-token cross-entropy, summed over every masked position of the global
  batch and divided by their count (so gradient accumulation over micro-batches gives exactly the
  full-batch gradient, and every device count gives the same mean), through the model's own
  ``loss`` (the chunked LM head + cross-entropy of :func:`qdelta_jax.model.chunked_cross_entropy`:
  no ``[B, T, vocab]`` logits are kept); the token accuracy (an argmax over the vocabulary) only
  with ``accuracy=True``,
* skips the update when the loss or the gradient norm is not finite: params and optimizer state
  are kept, ``bad_steps`` (consecutive) and ``skipped`` (total) count up; the driver stops the
  run after ``--max-bad-steps`` consecutive ones,
* donates the old state's buffers.

Optimizer (docs/MATH.md section 5): AdamW ``b1 0.9, b2 0.95, eps 1e-15``, weight decay 0.1 except on
``A_log``, ``dt_bias``, norm weights and biases; linear warm-up to the peak lr, then cosine to
0.1x peak at the last step; gradients clipped to global norm 1.0. With bfloat16 params the
optimizer runs on a float32 master copy kept in its state (:func:`with_float32_master`).

The step's loss and optimizer run under the named scopes ``lm_head_loss`` and ``optimizer``, so
profiles (``benchmarks/profile_step.py``) can attribute their kernels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qdelta_jax.model import weight_decay_mask

PyTree = Any

@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    warmup: int = 100
    steps: int = 1000
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-15
    clip: float = 1.0
    final_lr_ratio: float = 0.1
    grad_accum: int = 1


def lr_schedule(cfg: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up over ``warmup`` steps (step 0 already gets ``lr / warmup``, so no step is
    wasted at lr 0), then cosine from ``lr`` down to ``final_lr_ratio * lr`` at ``steps - 1``:
    optax's linear and cosine schedules joined at ``warmup``."""
    warmup = max(int(cfg.warmup), 0)
    cosine = optax.cosine_decay_schedule(cfg.lr, max(int(cfg.steps) - warmup - 1, 1),
                                         alpha=cfg.final_lr_ratio)
    if warmup == 0:
        return cosine
    warm = optax.linear_schedule(cfg.lr / warmup, cfg.lr, warmup - 1)
    return optax.join_schedules([warm, cosine], [warmup])


def _path_names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def _pure_keys(path) -> list:
    # A param State path is dict keys then the Variable's ``.value``; the pure dict has only
    # the keys.
    return [k.key if hasattr(k, "key") else k.idx for k in path if hasattr(k, "key") or
            hasattr(k, "idx")]


def path_str(path) -> str:
    return "/".join(_path_names(path))


class MasterCopyState(NamedTuple):
    """State of :func:`with_float32_master`: the float32 copy of the params and the state of
    the wrapped optimizer, which sees only that copy."""

    master: PyTree
    inner: PyTree

    def params_like(self, params: PyTree) -> PyTree:
        """The master copy rounded to the dtypes of ``params``."""
        return jax.tree.map(lambda m, p: m.astype(p.dtype), self.master, params)


def with_float32_master(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``tx`` on a float32 master copy of low-precision (bfloat16) params.

    The model computes with the bfloat16 params and gets bfloat16 gradients; ``update`` casts
    them to float32, updates the float32 copy (so updates smaller than a bfloat16 ulp of a
    weight still accumulate) and returns float32 updates of the copy. The train step then sets
    the params to the copy rounded to their dtype (:meth:`MasterCopyState.params_like`) rather
    than adding the updates to the bfloat16 params.
    """

    def f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    def init(params):
        master = f32(params)
        return MasterCopyState(master, tx.init(master))

    def update(grads, state, params=None):
        del params
        updates, inner = tx.update(f32(grads), state.inner, state.master)
        return updates, MasterCopyState(optax.apply_updates(state.master, updates), inner)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, decay_mask: PyTree | Callable | None = None,
                   float32_master: bool = False):
    """AdamW with the recipe of docs/MATH.md section 5 (see the module docstring). ``decay_mask``
    is a tree of bools (or a function of the params giving one); default
    :func:`qdelta_jax.model.weight_decay_mask`.
    ``float32_master``: for bfloat16 params, keep a float32 copy in the optimizer state
    (:func:`with_float32_master`)."""
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(
            lr_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask if decay_mask is not None else weight_decay_mask,
        ),
    )
    return with_float32_master(tx) if float32_master else tx


class ModelFns:
    """An NNX model seen as pure functions of a params dict.

    ``ModelFns(make_model)`` builds the model abstractly (no memory), keeps its graph definition,
    and ``init(shardings)`` materialises the params (and any non-param state) with ``jax.jit``
    directly into the requested shardings, so a large model never sits whole on one device.
    """

    def __init__(self, make_model: Callable[[], nnx.Module]):
        self.make_model = make_model
        abstract = nnx.eval_shape(make_model)
        self.graphdef, params_state, rest = nnx.split(abstract, nnx.Param, ...)
        self._param_treedef = jax.tree.structure(params_state)
        self._param_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params_state)[0]]
        self.abstract_params = nnx.to_pure_dict(params_state)
        self.abstract_rest = rest
        self.rest = None

    def init(self, param_shardings=None) -> PyTree:
        def init_fn():
            _, params_state, rest = nnx.split(self.make_model(), nnx.Param, ...)
            return nnx.to_pure_dict(params_state), rest

        out_shardings = None if param_shardings is None else (param_shardings, None)
        params, self.rest = jax.jit(init_fn, out_shardings=out_shardings)()
        return params

    def _to_state(self, params):
        leaves = []
        for path in self._param_paths:
            node = params
            for key in _pure_keys(path):
                node = node[key]
            leaves.append(node)
        return jax.tree.unflatten(self._param_treedef, leaves)

    def _model(self, params):
        rest = self.rest if self.rest is not None else self.abstract_rest
        return nnx.merge(self.graphdef, self._to_state(params), rest)

    def apply(self, params, tokens, cu_seqlens=None):
        model = self._model(params)
        if cu_seqlens is None:
            return model(tokens)
        return model(tokens, cu_seqlens=cu_seqlens)

    def loss(self, params, batch: dict, with_correct: bool = False):
        """``(nll_sum, correct_sum)`` of a batch: the model's own ``loss`` method (the chunked
        LM head + cross-entropy of :meth:`qdelta_jax.model.QDeltaLM.loss`, no ``[B, T, vocab]``
        logits) when it has one, else from its logits. ``correct_sum`` is 0 unless
        ``with_correct`` (it costs an argmax over the vocabulary per token)."""
        model = self._model(params)
        kw = {} if batch.get("cu_seqlens") is None else {"cu_seqlens": batch["cu_seqlens"]}
        if hasattr(model, "loss"):
            out = model.loss(batch["inputs"], batch["targets"], batch["mask"],
                             return_correct=with_correct, **kw)
            return out if with_correct else (out, jnp.zeros((), jnp.float32))
        logits = model(batch["inputs"], **kw)
        with jax.named_scope("lm_head_loss"):
            nll, correct = _token_stats(logits, batch["targets"], batch["mask"])
        return jnp.sum(nll), (jnp.sum(correct) if with_correct else jnp.zeros((), jnp.float32))


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: a pytree, saved whole in each checkpoint.

    ``step`` counts steps taken (skipped ones included: it is also the data position);
    ``bad_steps`` counts consecutive non-finite steps, ``skipped`` all of them.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    bad_steps: jax.Array
    skipped: jax.Array

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def init_train_state(params: PyTree, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        bad_steps=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def _global_norm(tree):
    tree_mod = getattr(optax, "tree", None)  # optax >= 0.2.5; global_norm is deprecated there
    if tree_mod is not None and hasattr(tree_mod, "norm"):
        return tree_mod.norm(tree)
    return optax.global_norm(tree)


def _token_stats(logits, targets, mask):
    """Per-position masked nll and correctness, float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (lse - picked) * mask
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask
    return nll, correct


def make_train_step(
    fns: ModelFns,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    accuracy: bool = False,
):
    """Returns the pure ``train_step(state, batch) -> (state, metrics)`` (not yet jitted).
    ``schedule`` (the lr schedule) only feeds the ``lr`` metric. With ``grad_accum > 1`` the
    batch is cut into that many micro-batches (the batch size must divide by it) and their
    gradients are summed in a ``lax.scan``. ``accuracy`` adds the batch's token accuracy to the
    metrics (an argmax over the vocabulary per token; off, the step computes none)."""

    def micro_loss(params, mb, denom):
        nll, correct = fns.loss(params, mb, accuracy)
        return nll / denom, correct

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        mask = batch["mask"].astype(jnp.float32)
        count = jnp.sum(mask)
        denom = jnp.maximum(count, 1.0)
        batch = {**batch, "mask": mask}
        if grad_accum == 1:
            (loss, correct), grads = grad_fn(state.params, batch, denom)
        else:
            # Micro-batch m takes rows m, m + A, m + 2A, ...: a reshape of the batch axis that
            # keeps each device's rows on that device (the batch axis stays sharded).
            def split(x):
                return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]),
                                    0, 1)

            micro = jax.tree.map(split, batch)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

            def body(carry, mb):
                g_acc, l_acc, c_acc = carry
                (l, c), g = grad_fn(state.params, mb, denom)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None

            (grads, loss, correct), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro
            )
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        with jax.named_scope("optimizer"):
            grad_norm = _global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, new_opt = tx.update(grads, state.opt_state, state.params)
            if isinstance(new_opt, MasterCopyState):
                new_params = new_opt.params_like(state.params)
            else:
                new_params = optax.apply_updates(state.params, updates)

            def keep(new, old):
                return jnp.where(ok, new, old)

            kept_params = jax.tree.map(keep, new_params, state.params)
            kept_opt = jax.tree.map(keep, new_opt, state.opt_state)

        rng, _ = jax.random.split(state.rng)
        new_state = TrainState(
            step=state.step + 1,
            params=kept_params,
            opt_state=kept_opt,
            rng=rng,
            bad_steps=jnp.where(ok, 0, state.bad_steps + 1).astype(jnp.int32),
            skipped=state.skipped + (~ok).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            # Skipped steps leave the optimizer's own step count alone.
            "lr": (schedule(state.step - state.skipped) if schedule is not None
                   else jnp.zeros((), jnp.float32)),
            "tokens": count,
            "finite": ok,
            "bad_steps": new_state.bad_steps,
            "skipped": new_state.skipped,
        }
        if accuracy:
            metrics["accuracy"] = correct / denom
        return new_state, metrics

    return train_step


def make_eval_step(fns: ModelFns):
    """Returns the pure ``eval_step(params, batch) -> sums`` (not yet jitted): sums over the batch
    of the masked loss, correct tokens, masked tokens, rows answered exactly (every masked
    position right) and rows with any masked position. Divide on the host after summing over
    batches (:func:`summarise_eval`)."""

    def eval_step(params, batch):
        mask = batch["mask"].astype(jnp.float32)
        logits = fns.apply(params, batch["inputs"], batch.get("cu_seqlens"))
        nll, correct = _token_stats(logits, batch["targets"], mask)
        has = jnp.sum(mask, axis=1) > 0
        exact = jnp.all((correct > 0) | (mask == 0), axis=1) & has
        return {
            "loss_sum": jnp.sum(nll),
            "correct": jnp.sum(correct),
            "tokens": jnp.sum(mask),
            "exact": jnp.sum(exact.astype(jnp.float32)),
            "rows": jnp.sum(has.astype(jnp.float32)),
        }

    return eval_step


def summarise_eval(sums: list[dict]) -> dict[str, float]:
    tot = {k: float(sum(float(s[k]) for s in sums)) for k in sums[0]}
    tokens, rows = max(tot["tokens"], 1.0), max(tot["rows"], 1.0)
    return {
        "loss": tot["loss_sum"] / tokens,
        "accuracy": tot["correct"] / tokens,
        "exact_match": tot["exact"] / rows,
        "tokens": tot["tokens"],
    }


# ----------------------------------------------------------------------------------------------
# FLOPs accounting (for tokens/s and MFU)


def count_params(params: PyTree) -> int:
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def flops_per_token(params: PyTree, model_cfg: Any = None, seq_len: int = 0) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    ``6 * N`` for the matmul parameters (every parameter except the input embedding table, which
    is a gather; the untied output head is a matmul and counts), plus the Q-Delta op itself, per
    layer and head with chunk C, key dim K, value dim V (docs/MATH.md section 2):
    ``2 * (3*C*K + 2*C*V + 3*K*V)`` forward FLOPs a token (``A``, ``Q K^T``, ``W`` ~ ``C K``
    each; ``U``, the intra-chunk output ~ ``C V``; ``W h``, ``Q h``, the state update ~ ``K V``),
    times 3. The triangular solve (``C^2/3`` a token) and elementwise work are left out.
    """
    n = count_params(params)
    emb = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path).lower()
        if "embed" in name and "norm" not in name:
            emb += math.prod(np.shape(leaf))
    total = 6.0 * (n - emb)
    if model_cfg is not None:
        L = int(getattr(model_cfg, "num_hidden_layers", 0) or 0)
        H = int(getattr(model_cfg, "num_heads", 0) or 0)
        K = int(getattr(model_cfg, "head_dim", 0) or 0)
        V = int(round(K * float(getattr(model_cfg, "expand_v", 2.0) or 2.0)))
        Hv = int(getattr(model_cfg, "num_v_heads", None) or H)
        C = int(getattr(model_cfg, "chunk_size", 64) or 64)
        if seq_len:
            C = min(C, seq_len)
        total += 3.0 * L * Hv * 2.0 * (3 * C * K + 2 * C * V + 3 * K * V)
    return total


# Dense bf16 peak FLOP/s by device kind substring (float32 matmuls use TF32 at half of it).
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device_kind: str, dtype: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for ``dtype`` ("bfloat16" or "float32"), or None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    for k, v in PEAK_BF16.items():
        if k.lower() in device_kind.lower():
            if "PCIe" in device_kind and k == "H100":
                v = 756e12
            return v if dtype == "bfloat16" else v / 2
    return None
