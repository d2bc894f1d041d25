"""Stability diagnostic of a Q-Delta model: the distribution of ``beta_t * c_t`` per layer and head.

docs/MATH.md section 1 (the paper's Lemma 3.1): with no decay (``a = 1``) one write multiplies the
prediction error along the write direction by ``1 - beta_t * c_t`` with

    c_t = k_t . x_t = k_t . (k_t + lam_t q_t) = 1 + lam_t (k_t . q_t)      (unit q, k)

so a step contracts when ``beta_t * c_t`` lies in ``(0, 2)``. With ``beta, lam`` in ``(0, 1)``
(the default gates) ``c_t`` lies in ``[1 - lam, 1 + lam]`` and the product stays in ``(0, 2)`` by
construction; with ``allow_neg_eigval`` (beta and lam doubled, both in ``(0, 2)``) it need not.
This module measures how often a trained model actually leaves ``(0, 2)`` and by how much.

Dimension letters: B batch, T time, H (value) heads, K key dim, L layers.

Three entry points, from the most raw to the most convenient:

* :func:`beta_c` -- ``beta * (k . (k + lam q))`` ``[B, T, HV]`` from the gate and q, k tensors
  (jit-friendly; works on arrays of any leading shape).
* :func:`summary` -- a JSON-able dict of per-layer, per-head statistics from a model and tokens,
  from the model's ``aux`` (``model(tokens, return_aux=True)``), or from per-layer ``beta * c``
  arrays already computed.
* :func:`format_table` -- the summary as a fixed-width text table.

The statistics run on the host in NumPy (float64), so they are exact for the values given;
``mask`` restricts them to chosen positions (for example real tokens, not padding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# Quantiles reported for every layer and head (as fractions of 1).
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
# The contraction interval of docs/MATH.md section 1.
LOW, HIGH = 0.0, 2.0


def beta_c(
    beta: Float[Array, "... H"],
    lam: Float[Array, "... H"],
    q: Float[Array, "... H K"],
    k: Float[Array, "... H K"],
) -> Float[Array, "... H"]:
    """``beta * c`` with ``c = k . (k + lam q)``, in float32.

    ``q`` and ``k`` are used as given: pass the L2-normalised vectors the op sees (the model's
    ``aux`` holds those). Shapes: ``beta, lam [..., H]``, ``q, k [..., H, K]``.
    """
    k = jnp.asarray(k, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    c = jnp.sum(k * k, axis=-1) + lam * jnp.sum(k * q, axis=-1)
    return jnp.asarray(beta, jnp.float32) * c


def beta_c_from_aux(aux: Sequence[Mapping[str, Array]]) -> list[Array]:
    """Per-layer ``beta * c`` ``[B, T, HV]`` from ``model(tokens, return_aux=True)[1]``."""
    return [beta_c(a["beta"], a["lam"], a["q"], a["k"]) for a in aux]


def _stats(values: np.ndarray) -> dict[str, float]:
    """Statistics of a 1-D float64 array (NaN fields when it is empty)."""
    n = int(values.size)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "min": nan, "max": nan, "mean": nan,
                **{_qname(p): nan for p in QUANTILES}, "outside": nan, "below": nan,
                "above": nan}
    qs = np.quantile(values, QUANTILES)
    below = int(np.sum(values <= LOW))
    above = int(np.sum(values >= HIGH))
    # NaN / inf count as outside: such a step contracts nothing.
    bad = int(np.sum(~np.isfinite(values)))
    return {
        "n": n,
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "mean": float(np.mean(values)),
        **{_qname(p): float(v) for p, v in zip(QUANTILES, qs, strict=True)},
        "outside": (below + above + bad) / n,
        "below": below / n,
        "above": above / n,
    }


def _qname(p: float) -> str:
    """``0.01 -> "q1"``, ``0.5 -> "q50"``, ``0.001 -> "q0.1"`` (percent)."""
    pct = 100.0 * p
    return f"q{pct:g}"


def summary_from_beta_c(
    layers: Sequence[Any],
    mask: Any = None,
) -> dict[str, Any]:
    """Statistics of per-layer ``beta * c`` arrays.

    Args:
      layers: one array per layer, shape ``[..., HV]`` (for example ``[B, T, HV]``; any leading
        axes, such as a stacked seed axis, are pooled).
      mask: optional boolean array broadcastable to ``layers[i].shape[:-1]`` (for example
        ``[B, T]``); only True positions count.

    Returns:
      ``{"interval": [0, 2], "overall": stats, "layers": [{"layer": i, "all": stats,
      "heads": [stats + {"head": h}, ...]}, ...]}`` where ``stats`` has ``n``, ``min``, ``max``,
      ``mean``, the quantiles ``q0.1 ... q99.9`` and ``outside`` (share of steps with
      ``beta * c`` not in the open interval ``(0, 2)``), split into ``below`` (``<= 0``) and
      ``above`` (``>= 2``).

    Raises:
      ValueError if a layer array has no head axis or the mask does not broadcast.
    """
    out_layers, pooled = [], []
    for i, bc in enumerate(layers):
        bc = np.asarray(jax.device_get(bc), np.float64)
        if bc.ndim < 1:
            raise ValueError(f"layer {i}: beta * c must have a trailing head axis [..., H], "
                             f"got shape {list(bc.shape)}")
        H = bc.shape[-1]
        if mask is None:
            sel = np.ones(bc.shape[:-1], bool)
        else:
            m = np.asarray(jax.device_get(mask)).astype(bool)
            try:
                sel = np.broadcast_to(m, bc.shape[:-1])
            except ValueError:
                raise ValueError(f"mask of shape {list(m.shape)} does not broadcast to the "
                                 f"positions {list(bc.shape[:-1])} of layer {i}") from None
        heads = []
        for h in range(H):
            v = bc[..., h][sel]
            heads.append({"head": h, **_stats(v)})
        vals = bc[sel].reshape(-1)
        pooled.append(vals)
        out_layers.append({"layer": i, "all": _stats(vals), "heads": heads})
    overall = _stats(np.concatenate(pooled) if pooled else np.zeros((0,)))
    return {"interval": [LOW, HIGH], "overall": overall, "layers": out_layers}


def summary(
    model_or_aux: Any,
    tokens: Any = None,
    *,
    mask: Any = None,
    cu_seqlens: Any = None,
) -> dict[str, Any]:
    """Stability statistics of a model on a batch (see :func:`summary_from_beta_c`).

    Args:
      model_or_aux: a :class:`qdelta_jax.model.QDeltaLM` (then ``tokens`` is required), or the
        ``aux`` tuple that ``model(tokens, return_aux=True)`` returns (per layer a dict with
        ``q, k [B, T, HV, K]`` normalised and ``beta, lam [B, T, HV]``), or a list of per-layer
        ``beta * c`` arrays ``[..., H]``.
      tokens: ``[B, T]`` int tokens, with a model.
      mask: optional ``[B, T]`` bool/0-1 array: only those positions count (e.g. skip padding).
      cu_seqlens: passed to the model (packed documents).

    Raises:
      ValueError when a model is given without tokens.
    """
    if hasattr(model_or_aux, "blocks"):
        if tokens is None:
            raise ValueError("summary(model, tokens): tokens [B, T] are required with a model")
        kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        _, aux = model_or_aux(jnp.asarray(tokens), return_aux=True, **kw)
        layers = beta_c_from_aux(aux)
    elif len(model_or_aux) and isinstance(model_or_aux[0], Mapping):
        layers = beta_c_from_aux(model_or_aux)
    else:
        layers = list(model_or_aux)
    return summary_from_beta_c(layers, mask)


def params_summary_fn(fns: Any):
    """A function ``(params, batch) -> summary`` for a training run's model (what
    ``qdelta-train --diagnostics`` logs at every evaluation): its ``beta * c`` computation is
    jitted once, when this is called; keep the function to reuse it.

    Args:
      fns: a :class:`qdelta_jax.train.loop.ModelFns` (its ``make_model`` builds the model).

    The returned function takes the params pure dict of that model (``TrainState.params``),
    sharded or not, and a data batch: ``inputs [B, T]`` and optionally ``cu_seqlens``; every
    position counts."""
    from flax import nnx

    graphdef, abstract, rest = nnx.split(nnx.eval_shape(fns.make_model), nnx.Param, ...)
    rest = fns.rest if fns.rest is not None else rest

    @jax.jit
    def beta_c(params, tokens, cu_seqlens):
        state = jax.tree.map(lambda x: x, abstract)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state, rest)
        kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        _, aux = model(tokens, return_aux=True, **kw)
        return beta_c_from_aux(aux)

    def summary_of(params: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        layers = beta_c(params, jnp.asarray(batch["inputs"]), batch.get("cu_seqlens"))
        return summary_from_beta_c(layers)

    return summary_of


def summary_from_params(fns: Any, params: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """``params_summary_fn(fns)(params, batch)``, once (it compiles each call: keep
    :func:`params_summary_fn`'s function to evaluate repeatedly)."""
    return params_summary_fn(fns)(params, batch)


def compact(s: Mapping[str, Any]) -> dict[str, Any]:
    """A short form of a summary for a metrics line: overall min / q1 / q50 / q99 / max /
    outside, and the per-layer share outside."""
    o = s["overall"]
    return {
        "min": o["min"], "q1": o["q1"], "q50": o["q50"], "q99": o["q99"], "max": o["max"],
        "outside": o["outside"],
        "outside_by_layer": [layer["all"]["outside"] for layer in s["layers"]],
    }


def _f(x: float, width: int = 8) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{width}}"
    return f"{x:>{width}.4f}"


def format_table(s: Mapping[str, Any], *, markdown: bool = False) -> str:
    """The summary as a table, one row per layer and head plus one per layer ("all").

    Columns: layer, head, min, q1, q50, q99, max, mean, outside (percent of steps with
    ``beta * c`` not in ``(0, 2)``). ``markdown=True`` gives a Markdown table.
    """
    cols = ["layer", "head", "min", "q1", "q50", "q99", "max", "mean", "outside %"]
    rows = []
    for layer in s["layers"]:
        for st in [*layer["heads"], {**layer["all"], "head": "all"}]:
            rows.append([
                str(layer["layer"]), str(st["head"]),
                *(_f(st[k]).strip() for k in ("min", "q1", "q50", "q99", "max", "mean")),
                "-" if math.isnan(st["outside"]) else f"{100 * st['outside']:.3f}",
            ])
    o = s["overall"]
    rows.append(["all", "all", *(_f(o[k]).strip() for k in ("min", "q1", "q50", "q99", "max",
                                                           "mean")),
                 "-" if math.isnan(o["outside"]) else f"{100 * o['outside']:.3f}"])
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
