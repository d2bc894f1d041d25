"""Orbax checkpoints, the run's config file and clean stops on SIGTERM/SIGINT.

A run directory holds:

* ``config.json`` -- ``{"model": ..., "train": ...}``, written when the run starts; the model
  part never changes (a later invocation with the same ``--run-dir`` resumes only if the model
  config is the same, else :class:`RunDirError` names the keys that differ), the train part is
  rewritten when a resumed invocation overrides options;
* ``checkpoints/<step>/`` -- Orbax steps, each a ``Composite`` of ``state`` (the whole
  :class:`~qdelta_jax.train.loop.TrainState` as a dict: params, optimizer state, step, RNG,
  bad-step counters), ``data`` (the data iterator's JSON state) and ``integrity`` (a checksum
  of every array of ``state``, computed on the devices before the save and compared after every
  restore); saves are asynchronous (training goes on while the arrays are written);
* ``checkpoint_health.json`` -- which steps are *good*: the trainer marks a checkpoint good once
  the steps around it were finite and their loss did not blow up (see
  :mod:`qdelta_jax.train.trainer`). The newest ``keep`` (3) steps are kept, and also the newest
  good one, however old;
* ``corrupt/<step>-<time>/`` -- a step that failed to restore (cut off mid-write, files missing
  or damaged, checksums that do not match) is moved here by training, with a warning, and the
  previous step is used. Evaluation opens the run read-only and only skips such a step;
* ``superseded/<time>/`` -- steps newer than the one a run was resumed from with
  ``--resume-from``, and the ``metrics.jsonl`` lines of steps that were computed again;
* ``metrics.jsonl`` (written by the trainer).

Nothing is deleted except by the keep-last-N rule. Orbax writes each step into a temporary
folder and renames it when complete, so a crash during a save leaves only an ignored temporary
folder; the checksums cover damage after that (a flipped bit, a truncated file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
HEALTH_FILE = "checkpoint_health.json"
INTEGRITY = "integrity"


class RunDirError(ValueError):
    """A ``--run-dir`` that cannot be used for this run; ``flag`` names the option."""

    def __init__(self, message: str, flag: str = "--run-dir"):
        super().__init__(message)
        self.flag = flag


class CheckpointFallbackWarning(UserWarning):
    """The latest checkpoint could not be restored; an older one is used."""


def write_run_config(run_dir: str | Path, config: dict[str, Any], *,
                     overwrite: bool = False) -> None:
    """Writes ``config.json`` (atomically) unless it already exists and ``overwrite`` is False."""
    path = Path(run_dir) / CONFIG_FILE
    if path.exists() and not overwrite:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run directory's ``config.json``, or None when there is none. Raises
    :class:`RunDirError` when it cannot be read or is not a run config."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    fix = ("restore it from a copy, or use a new --run-dir (the checkpoints need the model "
           "config it held)")
    try:
        text = path.read_text()
    except OSError as e:
        raise RunDirError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        what = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        raise RunDirError(f"{path} {what}; {fix}") from None
    if not (isinstance(cfg, dict) and isinstance(cfg.get("model"), dict)
            and isinstance(cfg.get("train"), dict)):
        raise RunDirError(f"{path} is not a qdelta-train run config (expected an object with "
                          f"'model' and 'train'); {fix}")
    return cfg


def diff_dicts(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Human-readable ``key: saved -> requested`` lines for every differing key."""
    out = []
    for k in sorted(set(saved) | set(requested)):
        a, b = saved.get(k, "<absent>"), requested.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} (saved) vs {b!r} (requested)")
    return out


def check_model_config(run_dir: str | Path, saved: dict, requested: dict) -> None:
    """Raises :class:`RunDirError` when the saved and requested model configs differ."""
    diffs = diff_dicts(saved, requested)
    if diffs:
        raise RunDirError(
            f"--run-dir {run_dir} holds a run with a different model config; keys that differ:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --run-dir, or the same model options as the saved run."
        )


def _mismatch(have: dict, want: dict, wanted: str) -> str:
    """What differs between two ``{array name: shape}`` maps, at most 5 names of each kind."""
    missing = sorted(set(want) - set(have))[:5]
    extra = sorted(set(have) - set(want))[:5]
    shape = [f"{k}: {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]][:5]
    return f"missing {missing}, unexpected {extra}, shapes saved vs {wanted} {shape}"


def _verify(integrity, tree) -> None:
    """Raises ValueError unless every array of ``tree`` matches the checksum saved with it in
    the step's ``integrity`` item (keys absent from ``tree`` are not read, so a partial restore
    checks just what it restored)."""
    saved = (integrity or {}).get("checksums")
    if not isinstance(saved, dict):
        raise ValueError("its checksum file (integrity/) is unreadable")
    bad = [k for k, v in checksums(tree).items() if saved.get(k) != v]
    if bad:
        more = ", ..." if len(bad) > 3 else ""
        raise ValueError(f"{len(bad)} arrays do not match the checksums saved with them "
                         f"({', '.join(bad[:3])}{more})")


class Checkpointer:
    """Saves and restores train state + data position under ``run_dir/checkpoints``.

    ``read_only=True`` (evaluation) never writes, moves or deletes anything: a checkpoint that
    fails is skipped with a warning instead of being set aside.
    """

    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.run_dir = Path(run_dir).absolute()
        self.dir = self.run_dir / "checkpoints"
        self.keep, self.async_save, self.read_only = keep, async_save, read_only
        self.main = jax.process_index() == 0
        self.health = read_health(self.run_dir)
        self._open()

    def _open(self) -> None:
        # Retention is ours (prune), not Orbax's max_to_keep: it must never delete the last
        # checkpoint marked good.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            save_interval_steps=0 if self.read_only else 1,
            create=not self.read_only,
            read_only=self.read_only,
            enable_async_checkpointing=self.async_save and not self.read_only,
        )
        # Registering the items up front lets item_metadata() read a step's tree before
        # restoring it (used to tell a different model from a damaged checkpoint).
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler = ocp.StandardCheckpointHandler()
        registry.add("state", ocp.args.StandardSave, state_handler)
        registry.add("state", ocp.args.StandardRestore, state_handler)
        for item in ("data", INTEGRITY):
            handler = ocp.JsonCheckpointHandler()
            registry.add(item, ocp.args.JsonSave, handler)
            registry.add(item, ocp.args.JsonRestore, handler)
        self.manager = ocp.CheckpointManager(self.dir, options=options, handler_registry=registry)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: dict, data_state: dict) -> bool:
        """Starts saving ``step`` (asynchronous) with a checksum of every array; returns False
        if that step already exists. Older steps beyond ``keep`` are pruned first (see
        :meth:`prune`), so a failing save never costs a checkpoint already on disk."""
        if step in self.manager.all_steps():
            return False
        sums = checksums(state)
        self.wait()
        self.prune()
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                **{INTEGRITY: ocp.args.JsonSave({"format": 1, "checksums": sums})},
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def prune(self) -> list[int]:
        """Deletes the complete steps older than the newest ``keep``, except the newest step
        marked good (:meth:`mark`); returns the deleted steps."""
        if self.read_only or not self.keep:
            return []
        steps = self.steps()
        keep = set(steps[-self.keep:])
        good = self.last_good()
        if good is not None:
            keep.add(good)
        gone = [s for s in steps if s not in keep]
        for s in gone:
            self.manager.delete(s)
        return gone

    # ------------------------------------------------------------------ health

    def mark(self, step: int, good: bool | None, why: str = "", window_ok: bool = True) -> None:
        """Records whether ``step`` is good (``None``: not judged yet; ``window_ok`` then says
        whether the steps seen since the previous checkpoint were healthy) in
        ``checkpoint_health.json``."""
        self.health[int(step)] = {"good": good, "why": why, "window_ok": bool(window_ok)}
        if self.main and not self.read_only:
            write_health(self.run_dir, self.health)

    def is_bad(self, step: int) -> bool:
        return self.health.get(int(step), {}).get("good") is False

    def last_good(self) -> int | None:
        """The newest existing step marked good, or None."""
        good = [s for s in self.steps() if self.health.get(s, {}).get("good") is True]
        return max(good) if good else None

    # ------------------------------------------------------------------ restoring

    def restore_latest(self, abstract_state: dict, *, skip_bad: bool = False):
        """Restores the newest step that reads back whole and matches its checksums:
        ``(step, state, data_state)``, or None when there is no checkpoint. ``abstract_state``
        gives the tree, shapes, dtypes and shardings (``jax.ShapeDtypeStruct`` leaves).
        ``skip_bad`` passes over the steps marked bad (with a warning).

        A step whose files are missing, damaged or do not match their checksums is moved to
        ``corrupt/`` (in read-only mode: left in place) with a
        :class:`CheckpointFallbackWarning`, and the one before it is tried. A step that reads
        fine but holds a different tree (other parameter names or shapes) raises
        :class:`RunDirError` instead: that is a different model, not damage. If steps existed
        but none could be restored, raises :class:`RunDirError`.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failed = []
        for step in steps:
            if skip_bad and self.is_bad(step):
                warnings.warn(
                    f"checkpoint step {step} in {self.dir} is marked bad "
                    f"({self.health[step].get('why')}); using an older one",
                    CheckpointFallbackWarning, stacklevel=2)
                continue
            try:
                return self._restore_step(step, abstract_state)
            except CheckpointDamage as e:
                self._fallback(step, e.__cause__ or e)
                failed.append(step)
        if steps:
            where = (f"moved to {self.run_dir / 'corrupt'}" if not self.read_only and failed
                     else "left in place")
            raise RunDirError(
                f"none of the checkpoints {steps} in {self.dir} could be restored ({where}); "
                "rerun qdelta-train to start this run over, or use a new --run-dir"
            )
        return None

    def restore_step(self, step: int, abstract_state: dict) -> tuple[int, dict, dict]:
        """Restores exactly ``step``; raises :class:`RunDirError` when it does not exist or
        fails (nothing is moved)."""
        if step not in self.manager.all_steps():
            raise RunDirError(
                f"--resume-from {step}: no such checkpoint in {self.dir}; the steps there are "
                f"{self.steps()}", "--resume-from")
        try:
            return self._restore_step(step, abstract_state)
        except CheckpointDamage as e:
            raise RunDirError(f"--resume-from {step}: checkpoint {self.dir / str(step)} cannot "
                              f"be used: {_one_line(e.__cause__ or e)}", "--resume-from") from None

    def _restore_step(self, step: int, abstract_state: dict):
        want = _shapes(abstract_state)
        try:
            meta = self.manager.metadata(step).item_metadata["state"]
            have = _shapes(meta)
        except Exception as e:  # noqa: BLE001 -- unreadable metadata means damage
            raise CheckpointDamage() from e
        if not have:
            raise CheckpointDamage() from ValueError("the array metadata (state/_METADATA) "
                                                     "is missing or empty")
        if set(have) != set(want) or any(have[k] != want[k] for k in want):
            raise RunDirError(f"checkpoint step {step} in {self.dir} holds a different train "
                              f"state ({_mismatch(have, want, 'requested')})")
        verified = (self.dir / str(step) / INTEGRITY).is_dir()
        items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
        if verified:
            items[INTEGRITY] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            data_state = restored["data"]
            if not isinstance(data_state, dict) or "index" not in data_state:
                raise ValueError("the data position (data/) is missing or unreadable")
            if verified:
                _verify(restored[INTEGRITY], restored["state"])
        except Exception as e:  # noqa: BLE001 -- any read failure means damage
            raise CheckpointDamage() from e
        if not verified:
            self._warn_unverified(step)
        return step, restored["state"], data_state

    def restore_params(self, abstract_params: dict, step: int | None = None,
                       flag: str = "RUN_DIR") -> tuple[int, dict]:
        """Restores only ``state["params"]`` of a step (the optimizer state is not read):
        ``(step, params)``, each array checked against the checksum saved with it.

        ``abstract_params`` gives the tree, shapes and shardings (``jax.ShapeDtypeStruct``
        leaves); the arrays come back in their saved dtype. ``step=None`` takes the newest step
        not marked bad that reads back (a damaged one is skipped with a
        :class:`CheckpointFallbackWarning`, or set aside unless read-only); an explicit
        ``step`` must exist and read back. Raises :class:`RunDirError` (``flag`` names the
        option) for a missing step, damage of an explicit step, parameters of another model
        (names or shapes), or when no step can be restored.
        """
        steps = self.steps()
        if step is not None and step not in steps:
            raise RunDirError(f"step {step}: no such checkpoint in {self.dir}; the steps there "
                              f"are {steps}", flag)
        candidates = [step] if step is not None else list(reversed(steps))
        for s in candidates:
            if step is None and self.is_bad(s):
                warnings.warn(
                    f"checkpoint step {s} in {self.dir} is marked bad "
                    f"({self.health[s].get('why')}); using an older one",
                    CheckpointFallbackWarning, stacklevel=2)
                continue
            try:
                return s, self._restore_params(s, abstract_params, flag)
            except CheckpointDamage as e:
                if step is not None:
                    raise RunDirError(f"checkpoint {self.dir / str(s)} cannot be used: "
                                      f"{_one_line(e.__cause__ or e)}", flag) from None
                self._fallback(s, e.__cause__ or e)
        if not steps:
            raise RunDirError(f"{self.dir} holds no checkpoint", flag)
        bad = [s for s in steps if self.is_bad(s)]
        raise RunDirError(f"no checkpoint in {self.dir} could be restored (steps {steps}"
                          + (f", marked bad: {bad}" if bad else "") + ")", flag)

    def _restore_params(self, step: int, abstract_params: dict, flag: str) -> dict:
        want = _shapes({"params": abstract_params})
        try:
            meta = self.manager.metadata(step).item_metadata["state"]
            have_meta = {"params": meta["params"]}
            have = _shapes(have_meta)
        except Exception as e:  # noqa: BLE001 -- unreadable metadata means damage
            raise CheckpointDamage() from e
        if have != want:
            raise RunDirError(f"checkpoint step {step} in {self.dir} holds the parameters of "
                              f"another model ({_mismatch(have, want, 'expected')})", flag)
        # Orbax's metadata names layer indices as strings: match the leaves by name.
        saved_dtypes = dict(zip(_names(have_meta), [m.dtype for m in jax.tree.leaves(have_meta)],
                                strict=True))
        wanted = {"params": abstract_params}
        item = jax.tree.unflatten(jax.tree.structure(wanted), [
            jax.ShapeDtypeStruct(a.shape, saved_dtypes[n], sharding=a.sharding)
            for n, a in zip(_names(wanted), jax.tree.leaves(wanted), strict=True)])
        verified = (self.dir / str(step) / INTEGRITY).is_dir()
        try:
            # Orbax's PyTree handler reads a subtree of the saved state (partial_restore), so
            # the optimizer's moments are never loaded.
            restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
                self.dir / str(step) / "state",
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True))
            if verified:
                _verify(self.manager.restore(step, args=ocp.args.Composite(
                    **{INTEGRITY: ocp.args.JsonRestore()}))[INTEGRITY], restored)
        except Exception as e:  # noqa: BLE001 -- any read failure means damage
            raise CheckpointDamage() from e
        if not verified:
            self._warn_unverified(step)
        return restored["params"]

    def _warn_unverified(self, step: int) -> None:
        warnings.warn(f"checkpoint step {step} in {self.dir} has no checksums (saved by an "
                      "older version); restored without verification",
                      CheckpointFallbackWarning, stacklevel=4)

    def set_aside_after(self, step: int) -> Path | None:
        """Moves every step newer than ``step`` to ``superseded/<time>/`` (never deletes), so a
        run resumed from ``step`` can save those step numbers again."""
        newer = [s for s in self.steps() if s > step]
        if not newer or self.read_only:
            return None
        self.wait()
        dst = self.run_dir / "superseded" / _stamp()
        for s in newer:
            self.health.pop(s, None)
        if self.main:
            dst.mkdir(parents=True, exist_ok=True)
            for s in newer:
                shutil.move(str(self.dir / str(s)), str(dst / str(s)))
            write_health(self.run_dir, self.health)
        _sync("set_aside_after")
        self.manager.reload()
        return dst

    def _quarantine(self, step: int) -> Path:
        self.wait()
        src = self.dir / str(step)
        dst = self.run_dir / "corrupt" / f"{step}-{_stamp()}"
        if self.main:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                shutil.move(str(src), str(dst))
        _sync("quarantine")
        self.manager.reload()
        return dst

    def _fallback(self, step: int, err: BaseException) -> None:
        if self.read_only:
            what = "skipped it (left in place)"
        else:
            what = f"moved it to {self._quarantine(step)}"
        warnings.warn(
            f"checkpoint step {step} in {self.dir} could not be restored "
            f"({type(err).__name__}: {_one_line(err)}); {what} and falling back to the "
            "previous checkpoint",
            CheckpointFallbackWarning,
            stacklevel=4,
        )


class CheckpointDamage(Exception):
    """Internal: a step failed to read back; ``__cause__`` is why."""


def _one_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:300] if str(err) else ""


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"qdelta_checkpoint_{name}")


def read_health(run_dir: str | Path) -> dict[int, dict]:
    """``checkpoint_health.json`` as ``{step: {"good": bool | None, "why": str, ...}}``; an
    absent or unreadable file reads as empty (no step known good)."""
    path = Path(run_dir) / HEALTH_FILE
    try:
        raw = json.loads(path.read_text())
        return {int(k): dict(v) for k, v in raw.get("steps", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def write_health(run_dir: str | Path, health: dict[int, dict]) -> None:
    path = Path(run_dir) / HEALTH_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"steps": {str(k): health[k] for k in sorted(health)}}, indent=1))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Checksums


def _leaf_checksum(x):
    """Two 32-bit sums over the array's bits, each element weighted by an odd function of its
    position: any change of one element changes both sums, moving elements changes them too, and
    the sums do not depend on how the array is sharded (elementwise work and one reduction)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = x.dtype.itemsize
    if size == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif size == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif size == 1:
        bits = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(
            x, jnp.uint8)
        bits = bits.astype(jnp.uint32)
    else:
        raise TypeError(f"checksums: unsupported dtype {x.dtype}")
    idx = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
        stride *= x.shape[d]
    m1 = (idx * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
    m2 = ((idx ^ jnp.uint32(0x5BD1E995)) * jnp.uint32(0x85EBCA6B)) | jnp.uint32(1)
    s1 = jnp.sum(bits * m1, dtype=jnp.uint32)
    s2 = jnp.sum((bits ^ (bits >> 15)) * m2, dtype=jnp.uint32)
    return jnp.stack([s1, s2])


@jax.jit
def _tree_checksums(tree):
    return jax.tree.map(_leaf_checksum, tree)


def checksums(tree) -> dict[str, str]:
    """``{leaf name: 16 hex digits}`` for every array of ``tree`` (names as in Orbax's tree
    metadata). Computed on the devices where the arrays live; only 8 bytes a leaf come back."""
    sums = jax.device_get(_tree_checksums(tree))
    return {name: f"{int(s[0]):08x}{int(s[1]):08x}"
            for name, s in zip(_names(sums), jax.tree.leaves(sums), strict=True)}


def _names(tree) -> list[str]:
    return [
        ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """``{"params.blocks.0.attn.A_log": shape, ...}`` -- Orbax's own leaf naming."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(
            str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path
        )
        out[name] = tuple(leaf.shape)
    return out


class _OneLine(logging.Filter):
    def filter(self, record):
        # Orbax logs a failed background write with its traceback from every thread involved;
        # the caller reports the failure itself, so one line each is enough.
        if record.levelno >= logging.ERROR or record.exc_info:
            msg = record.getMessage().splitlines()
            record.msg, record.args = (msg[0][:300] if msg else ""), ()
            record.exc_info = record.exc_text = None
        return True


@contextlib.contextmanager
def quiet_orbax_logs():
    """Within the block, Orbax's (absl) error logs are one line each, without tracebacks."""
    logger, f = logging.getLogger("absl"), _OneLine()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


class StopSignal:
    """Turns SIGTERM and the first SIGINT into a flag the loop polls (:meth:`should_stop`), so
    the run saves a checkpoint and exits cleanly; a second SIGINT interrupts at once. Use as a
    context manager; the previous handlers come back on exit. Only the main thread can install
    handlers; elsewhere this is a flag that is never set.

    With several processes, SIGTERM (a preemption notice, often sent to one host only) is left
    to JAX's preemption service, which agrees on a step: every process stops after that same
    step, so their saves and collectives stay matched."""

    def __init__(self, multi_process: bool = False):
        self.signum: int | None = None
        self.multi = multi_process
        self._old: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def should_stop(self, step: int) -> bool:
        """Whether to stop after ``step``; call it after every step, on every process."""
        if self.multi:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = signal.SIGTERM
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for s in (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False
