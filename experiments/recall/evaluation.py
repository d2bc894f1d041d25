"""Evaluation on held-out rows: recall per setting and seed, and the stability diagnostic.

The metrics are ``loop.make_eval_step``'s (masked loss, token accuracy, exact match of a row's
masked positions), summed per setting: the rows of one setting are contiguous in the batch
(:mod:`experiments.recall.tasks`), so the batch is reshaped to ``[settings, rows, T]`` and the
eval step mapped over the settings. The diagnostic (``beta_t * c_t`` of docs/MATH.md section 1,
and the learned ``lam``) comes from the model's ``aux`` outputs on the same rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdelta_jax import diagnostics
from qdelta_jax.train import loop


def _model_with_aux(fns: loop.ModelFns, params: Any):
    # ``ModelFns.apply`` returns logits only; the diagnostic needs the model's aux outputs, so
    # the model is rebuilt from the params as qdelta_jax.diagnostics.params_summary_fn does.
    graphdef, abstract, rest = nnx.split(nnx.eval_shape(fns.make_model), nnx.Param, ...)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


class EvalProgram:
    """The evaluation program of one (variant, task), lowered for ``n_seeds`` seeds.

    ``run(params, inputs, targets, mask)`` (params with a leading seed axis, the rest
    ``[S, B_eval, T]``) gives ``sums``: a dict of ``loop.make_eval_step``'s sums per seed and
    setting ``[S, J]``, ``beta_c`` and ``lam`` ``[S, L, B_eval, T, H]``.
    """

    def __init__(self, fns: loop.ModelFns, task, n_seeds: int, abstract_params: Any):
        eval_step = loop.make_eval_step(fns)
        J, R, T = task.n_settings, task.eval_rows, task.T

        def eval_one(params, inputs, targets, mask):
            per_setting = {"inputs": inputs.reshape(J, R, T), "targets": targets.reshape(J, R, T),
                           "mask": mask.reshape(J, R, T)}
            sums = jax.vmap(eval_step, in_axes=(None, 0))(params, per_setting)
            _, aux = _model_with_aux(fns, params)(inputs, return_aux=True)
            beta_c = jnp.stack(diagnostics.beta_c_from_aux(aux))  # [L, B, T, H]
            lam = jnp.stack([a["lam"] for a in aux])  # [L, B, T, H]
            return sums, beta_c, lam

        S, B = n_seeds, task.B_eval
        tokens = jax.ShapeDtypeStruct((S, B, T), jnp.int32)
        self.lowered = jax.jit(jax.vmap(eval_one)).lower(
            abstract_params, tokens, tokens, jax.ShapeDtypeStruct((S, B, T), jnp.float32))


def lam_summary(layers, valid) -> list[dict[str, Any]]:
    """Mean and 5 / 50 / 95 % quantiles of ``lam`` per layer and head over the ``valid``
    positions; ``layers`` is a list of ``[..., H]`` arrays shaped like ``valid`` plus H."""
    out = []
    for i, lam in enumerate(layers):
        lam = np.asarray(lam, np.float64)
        heads = []
        for h in range(lam.shape[-1]):
            x = lam[..., h][valid]
            heads.append({"head": h, "mean": float(x.mean()), "q5": float(np.quantile(x, 0.05)),
                          "q50": float(np.quantile(x, 0.5)), "q95": float(np.quantile(x, 0.95))})
        out.append({"layer": i, "heads": heads})
    return out


def run_records(variant: str, task, seeds, sums: dict[str, np.ndarray], curves: dict[str, Any],
                wall_s: float) -> list[dict[str, Any]]:
    """One record per seed and setting: the final metrics from ``sums`` (``[S, J]`` each, from
    :class:`EvalProgram`) and the training loss curves.

    ``curves``: ``rows [S, steps, B]`` (masked nll sums per row), ``counts [S, steps, B]`` (masked
    positions per row), ``losses [S, steps]`` (the batch losses) and ``steps_per_point`` (the
    steps a curve point averages: one round).
    """
    n = curves["steps_per_point"]
    rows, counts, losses = curves["rows"], curves["counts"], curves["losses"]
    points = rows.shape[1] // n
    curve_steps = [(i + 1) * n for i in range(points)]
    # NIAH trains every depth in every row: its per-setting curve is the one of all rows.
    per_setting = task.n_settings == len(set(task.row_setting.tolist()))
    out = []
    for si, seed in enumerate(seeds):
        overall = [float(x) for x in losses[si].reshape(-1, n).mean(-1)]
        for j in range(task.n_settings):
            tsel = (task.row_setting == j) if per_setting else np.ones(task.B, bool)
            num = rows[si][:, tsel].sum(-1).reshape(-1, n).sum(-1)
            den = np.maximum(counts[si][:, tsel].sum(-1).reshape(-1, n).sum(-1), 1)
            tokens = max(float(sums["tokens"][si, j]), 1.0)
            out.append({
                "variant": variant, "task": task.name, "setting": task.setting(j), "seed": seed,
                "accuracy": float(sums["correct"][si, j]) / tokens,
                "exact_match": float(sums["exact"][si, j]) / max(float(sums["rows"][si, j]), 1.0),
                "eval_loss": float(sums["loss_sum"][si, j]) / tokens,
                "eval_rows": int(task.eval_rows),
                "loss_curve": {"step": curve_steps, "loss": [float(x) for x in num / den]},
                "train_loss_curve_all_settings": overall,
                "wall_s": wall_s,
            })
    return out
