"""A trained model outside the trainer: :func:`load_run` and :func:`load_model`, and
parameters-only checkpoints.

``load_model(run_dir, step=None)`` returns the :class:`qdelta_jax.model.QDeltaLM` of a
``qdelta-train`` run directory (the newest checkpoint not marked bad, or ``step``), restoring
the parameters only (not the optimizer state) and checking each array against the checksum
saved with it. The run directory is opened read-only. ``load_run`` is the same load with what
``qdelta-eval`` and ``qdelta-generate`` also need: the step restored, the options the run was
trained with, its tokenizer, and the parameters laid out over a device mesh.

A *params directory* is what ``qdelta-convert`` writes from an HF folder and what
``qdelta-train --init-from`` starts from: the layout of a run directory holding parameters only,

* ``config.json``: ``{"model": <QDeltaConfig fields>, "train": {}, "source": ...,
  "hf_config": <the HF metadata keys>}``;
* ``checkpoints/0/``: an Orbax step whose ``state`` is ``{"params": ...}``, with the checksums of
  every array.

Everything here reads both kinds of directory: ``--init-from`` takes a run directory too (its
newest good parameters), and ``load_model`` a params directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train.options import TrainArgs, saved_values


def _read_saved(path: str | os.PathLike, flag: str) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise ckpt.RunDirError(f"{flag} {p}: no such directory", flag)
    try:
        saved = ckpt.read_run_config(p)
    except ckpt.RunDirError as e:
        raise ckpt.RunDirError(str(e), flag) from None
    if saved is None:
        raise ckpt.RunDirError(f"{flag} {p}: no {ckpt.CONFIG_FILE}; not a qdelta-train run or "
                               "a qdelta-convert params directory", flag)
    return saved


def _model_config(saved: dict, path, flag: str):
    from qdelta_jax.model import QDeltaConfig

    try:
        return QDeltaConfig(**saved["model"])
    except (TypeError, ValueError) as e:
        raise ckpt.RunDirError(f"{flag} {Path(path)}: {ckpt.CONFIG_FILE} holds an unusable "
                               f"model config ({e})", flag) from None


def read_model_config(path: str | os.PathLike, flag: str = "RUN_DIR"):
    """The :class:`qdelta_jax.model.QDeltaConfig` saved in a run or params directory. Raises
    :class:`~qdelta_jax.train.checkpoint.RunDirError` (naming ``flag``) when ``path`` is not
    one."""
    return _model_config(_read_saved(path, flag), path, flag)


def abstract_params(config) -> dict:
    """The parameter tree of ``QDeltaLM(config)`` as ``jax.ShapeDtypeStruct`` leaves (a pure
    dict, as the trainer saves it); nothing is allocated."""
    from flax import nnx

    from qdelta_jax.model import QDeltaLM

    model = nnx.eval_shape(lambda: QDeltaLM(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def restore_params(path: str | os.PathLike, config, *, step: int | None = None,
                   shardings: Any = None, flag: str = "RUN_DIR") -> tuple[int, dict]:
    """``(step, params)`` of a run or params directory: the parameters of ``config``'s model
    (a pure dict, in ``config.param_dtype``; ``shardings``: a tree of shardings, default one
    device), verified by their checksums. ``step=None``: the newest step not marked bad that
    reads back. Read-only. Raises :class:`~qdelta_jax.train.checkpoint.RunDirError`."""
    p = Path(path)
    if not p.is_dir():
        raise ckpt.RunDirError(f"{flag} {p}: no such directory", flag)
    if not (p / "checkpoints").is_dir():
        raise ckpt.RunDirError(f"{flag} {p}: no checkpoints/ folder, so no parameters", flag)
    tree = abstract_params(config)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, tree)
    tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)
    checkpointer = ckpt.Checkpointer(p, async_save=False, read_only=True)
    try:
        got, params = checkpointer.restore_params(tree, step, flag)
    finally:
        checkpointer.close()
    dtype = jnp.dtype(config.param_dtype)
    return got, jax.tree.map(lambda a: a if a.dtype == dtype else a.astype(dtype), params)


# QDeltaConfig fields that say how a model runs, not what its parameters are: a run started
# with --init-from may set them; every other field comes from the source.
RUNTIME_FIELDS = ("compute_dtype", "param_dtype", "implementation", "remat", "chunk_size")


def init_config(path: str | os.PathLike, *, data_vocab: int, fields: dict[str, Any],
                flag: str = "--init-from"):
    """The model config of a run that starts from the parameters in ``path``: the saved config
    with the :data:`RUNTIME_FIELDS` of ``fields`` applied. Raises ValueError naming ``flag``
    when ``fields`` changes any other field (another model), or when the data holds more token
    ids (``data_vocab``) than the model's vocabulary."""
    base = read_model_config(path, flag)
    other = {k: v for k, v in fields.items() if k not in RUNTIME_FIELDS}
    unknown = sorted(k for k in other if not hasattr(base, k))
    if unknown:
        raise ValueError(f"{flag} {path}: unknown model config fields {unknown}")
    changed = sorted(k for k, v in other.items() if getattr(base, k) != v)
    if changed:
        raise ValueError(
            f"{flag} {path}: the model comes from there; options that change it ("
            + ", ".join(f"{k} {other[k]!r}, saved {getattr(base, k)!r}" for k in changed)
            + ") cannot be combined with it")
    if data_vocab > base.vocab_size:
        raise ValueError(f"{flag} {path}: the data holds {data_vocab} token ids, more than the "
                         f"model's vocabulary of {base.vocab_size}")
    return dataclasses.replace(base, **{k: v for k, v in fields.items() if k in RUNTIME_FIELDS})


def param_shardings(config, mesh) -> dict:
    """The sharding of every parameter of ``QDeltaLM(config)`` over ``mesh``, by the
    parameters' logical axis names (:data:`qdelta_jax.train.sharding.LOGICAL_RULES`), as the
    trainer lays them out."""
    from flax import nnx

    from qdelta_jax.model import QDeltaLM
    from qdelta_jax.train import sharding as shd

    model = nnx.eval_shape(lambda: QDeltaLM(config, rngs=nnx.Rngs(0)))
    return shd.tree_shardings(mesh, abstract_params(config), shd.logical_axes(model))


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """A checkpoint's parameters with what describes them (:func:`load_run`)."""

    path: Path
    step: int  # the step restored
    config: Any  # the model's QDeltaConfig
    params: dict  # a pure dict of arrays, laid out as load_run was asked
    options: TrainArgs | None  # the qdelta-train options (None: a params directory)
    tokenizer: Path | None  # RUN_DIR/tokenizer.json, where the run has one

    def model(self):
        """The :class:`qdelta_jax.model.QDeltaLM` holding these parameters."""
        from flax import nnx

        from qdelta_jax.model import QDeltaLM

        graphdef, state = nnx.split(nnx.eval_shape(lambda: QDeltaLM(self.config,
                                                                    rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, self.params)
        return nnx.merge(graphdef, state)


def load_run(path: str | os.PathLike, *, step: int | None = None, mesh=None,
             implementation: str | None = None, flag: str = "RUN_DIR") -> SavedRun:
    """The parameters of a ``qdelta-train`` run directory (or a ``qdelta-convert`` params
    directory) and what describes them, restoring the parameters only.

    Args:
      path: the run directory.
      step: a saved step; ``None`` takes the newest one not marked bad (after a divergence)
        that reads back whole and matches its checksums (a damaged one is skipped with a
        warning; nothing in the directory is moved or written).
      mesh: a device mesh to lay the parameters out over (:func:`param_shardings`); default
        one device.
      implementation: overrides the saved model config's ``qdelta_rule`` implementation (the
        parameters do not depend on it).
      flag: how error messages name ``path``.

    Raises:
      qdelta_jax.train.checkpoint.RunDirError (a ``ValueError``): not a run directory, an
        unusable ``config.json``, no such step, a damaged ``step``, or no usable checkpoint.
    """
    p = Path(path)
    saved = _read_saved(p, flag)
    config = _model_config(saved, p, flag)
    if implementation is not None:
        config = dataclasses.replace(config, implementation=implementation)
    train = saved_values(saved.get("train") or {})
    try:
        options = TrainArgs(**train) if train else None
    except (TypeError, ValueError) as e:
        raise ckpt.RunDirError(f"{flag} {p}: {ckpt.CONFIG_FILE} holds unusable training "
                               f"options ({e})", flag) from None
    shardings = None if mesh is None else param_shardings(config, mesh)
    got, params = restore_params(p, config, step=step, shardings=shardings, flag=flag)
    from qdelta_jax.train.tokenize import TOKENIZER_COPY

    tokenizer = p / TOKENIZER_COPY
    return SavedRun(p, got, config, params, options, tokenizer if tokenizer.is_file() else None)


def load_model(run_dir: str | os.PathLike, step: int | None = None, *,
               implementation: str | None = None):
    """The :class:`qdelta_jax.model.QDeltaLM` of a ``qdelta-train`` run directory (or a
    ``qdelta-convert`` params directory), restoring its parameters only: ``load_run(run_dir,
    step=step, implementation=implementation).model()`` (see :func:`load_run` for the
    arguments and what raises)."""
    return load_run(run_dir, step=step, implementation=implementation).model()


def save_params(path: str | os.PathLike, model, *, source: str | None = None,
                hf_config: dict | None = None) -> Path:
    """Writes ``model``'s parameters as a params directory (see the module docstring) that
    ``qdelta-train --init-from`` and :func:`load_model` read. ``source`` (where the weights
    came from) and ``hf_config`` (the HF metadata keys, for a later export) are recorded in
    ``config.json``. Refuses a ``path`` that exists and is not an empty folder
    (``FileExistsError``): nothing is overwritten."""
    from flax import nnx

    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise FileExistsError(f"{p} already exists and is not an empty folder; choose a new "
                              "output path")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckpt.write_run_config(p, {"model": model.config.to_dict(), "train": {}, "source": source,
                              "hf_config": hf_config or {}})
    checkpointer = ckpt.Checkpointer(p, async_save=False)
    try:
        checkpointer.save(0, {"params": params}, {"index": 0})
        checkpointer.wait()
    finally:
        checkpointer.close()
    return p
