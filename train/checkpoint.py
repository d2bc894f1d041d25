"""Orbax checkpoints, the run's config file and clean stops on SIGTERM/SIGINT.

A run directory holds:

* ``config.json`` -- ``{"model": ..., "train": ...}``, written once when the run starts and never
  rewritten; a later invocation with the same ``--run-dir`` resumes only if the model config is
  the same (else :class:`RunDirError` names the keys that differ);
* ``checkpoints/<step>/`` -- Orbax steps, each a ``Composite`` of ``state`` (the whole
  :class:`~qdelta_jax.train.loop.TrainState` as a dict: params, optimizer state, step, RNG,
  bad-step counters) and ``data`` (the data iterator's JSON state); the last ``keep`` (3) are
  kept, saves are asynchronous (training goes on while the arrays are written);
* ``corrupt/<step>-<time>/`` -- a step that failed to restore (cut off mid-write, files missing
  or damaged) is moved here, with a warning, and the previous good step is used. Nothing is
  deleted except by Orbax's keep-last-N policy;
* ``metrics.jsonl`` (written by the trainer).

Orbax writes each step into a temporary folder and renames it when complete, so a crash during a
save normally leaves only an ignored temporary folder; the fallback covers damage after that.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


class RunDirError(ValueError):
    """A ``--run-dir`` that cannot be used for this run."""

    flag = "--run-dir"


class CheckpointFallbackWarning(UserWarning):
    """The latest checkpoint could not be restored; an older one is used."""


def write_run_config(run_dir: str | Path, config: dict[str, Any]) -> None:
    """Writes ``config.json`` unless it already exists (never overwrites)."""
    path = Path(run_dir) / CONFIG_FILE
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.rename(path)


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"--run-dir {run_dir}: {CONFIG_FILE} is not valid JSON ({e})") from None


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


class Checkpointer:
    """Saves and restores train state + data position under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.run_dir = Path(run_dir).absolute()
        self.dir = self.run_dir / "checkpoints"
        self.keep, self.async_save = keep, async_save
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            enable_async_checkpointing=self.async_save,
        )
        # Registering the items up front lets item_metadata() read a step's tree before
        # restoring it (used to tell a different model from a damaged checkpoint).
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler, data_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
        registry.add("state", ocp.args.StandardSave, state_handler)
        registry.add("state", ocp.args.StandardRestore, state_handler)
        registry.add("data", ocp.args.JsonSave, data_handler)
        registry.add("data", ocp.args.JsonRestore, data_handler)
        self.manager = ocp.CheckpointManager(self.dir, options=options, handler_registry=registry)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: dict) -> bool:
        """Starts saving ``step`` (asynchronous); returns False if that step already exists."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def _quarantine(self, step: int) -> Path:
        self.wait()
        src = self.dir / str(step)
        dst = self.run_dir / "corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
            shutil.move(str(src), str(dst))
        self.manager.reload()
        return dst

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, dict] | None:
        """Restores the newest step that reads back whole: ``(step, state, data_state)``, or None
        when there is no checkpoint. ``abstract_state`` gives the tree, shapes, dtypes and
        shardings (``jax.ShapeDtypeStruct`` leaves).

        A step whose files are missing or damaged is moved to ``corrupt/`` with a
        :class:`CheckpointFallbackWarning` and the one before it is tried. A step that reads
        fine but holds a different tree (other parameter names or shapes) raises
        :class:`RunDirError` instead: that is a different model, not damage. If steps existed
        but none could be restored, raises :class:`RunDirError`.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        want = _shapes(abstract_state)
        for step in steps:
            try:
                meta = self.manager.metadata(step).item_metadata["state"]
                have = _shapes(meta)
            except Exception as e:  # noqa: BLE001 -- unreadable metadata means damage
                self._fallback(step, e)
                continue
            if set(have) != set(want) or any(have[k] != want[k] for k in want):
                missing = sorted(set(want) - set(have))[:5]
                extra = sorted(set(have) - set(want))[:5]
                shape = [f"{k}: {have[k]} vs {want[k]}" for k in want
                         if k in have and have[k] != want[k]][:5]
                raise RunDirError(
                    f"checkpoint step {step} in {self.dir} holds a different train state "
                    f"(missing {missing}, unexpected {extra}, shapes saved vs requested {shape})"
                )
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
                data_state = restored["data"]
                if not isinstance(data_state, dict) or "index" not in data_state:
                    raise ValueError("the data position (data/) is missing or unreadable")
            except Exception as e:  # noqa: BLE001 -- any read failure means damage
                self._fallback(step, e)
                continue
            return step, restored["state"], data_state
        if steps:
            raise RunDirError(
                f"none of the checkpoints {steps} in {self.dir} could be restored (moved to "
                f"{self.run_dir / 'corrupt'}); rerun to start this run over, or use a new --run-dir"
            )
        return None

    def _fallback(self, step: int, err: Exception) -> None:
        dst = self._quarantine(step)
        msg = str(err).splitlines()[0][:300] if str(err) else ""
        warnings.warn(
            f"checkpoint step {step} in {self.dir} could not be restored "
            f"({type(err).__name__}: {msg}); moved it to {dst} and falling back to the "
            "previous checkpoint",
            CheckpointFallbackWarning,
            stacklevel=3,
        )


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """``{"params.blocks.0.attn.A_log": shape, ...}`` -- Orbax's own leaf naming."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(
            str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path
        )
        out[name] = tuple(leaf.shape)
    return out


class StopSignal:
    """Turns SIGTERM and the first SIGINT into a flag the loop polls (``bool(stop)``), so the run
    saves a checkpoint and exits cleanly; a second SIGINT interrupts at once. Use as a context
    manager; the previous handlers come back on exit. Only the main thread can install handlers;
    elsewhere this is a flag that is never set."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
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
