"""The training driver behind ``qdelta-train``: :func:`run` trains as a
:class:`~qdelta_jax.train.options.TrainArgs` says, in four phases:

1. setup (:func:`_setup`): check the options, open the data, build the model config and the
   device mesh, create or check the run directory and its ``config.json``;
2. restore or init (:func:`_restore_or_init`): the newest usable checkpoint (or
   ``--resume-from``'s), else a fresh state (``--init-from``'s parameters or the model's
   initialisation); the model, optimizer and compiled steps are a :class:`Session`;
3. the loop (:class:`_TrainLoop`): steps, metrics, checkpoints, evaluations, stop signals;
4. the summary (:func:`_write_summary`): returned and written to ``RUN_DIR/summary.json``.

Loop details:

* the host dispatches step ``i + 1`` before it reads step ``i``'s metrics, so data preparation
  and logging overlap device work;
* ``RUN_DIR/metrics.jsonl`` gets one JSON line per step (``step``, ``loss``, ``grad_norm``,
  ``lr``, ``skipped``, ``step_time_s``, ``tokens_per_s``, ``mfu``; ``accuracy`` of the training
  batch with ``--train-accuracy``) and one per
  evaluation (``split: "eval"``, ``loss``, ``accuracy``, ``exact_match``; text runs add
  ``perplexity``, ``bits_per_byte`` and ``bytes``, see :func:`qdelta_jax.train.evaluate.
  text_metrics`); TensorBoard events too when ``tensorboardX`` is importable;
* throughput: ``tokens_per_s`` counts every input token (``B * T``) over the wall time between
  consecutive steps; ``mfu = flops_per_token * tokens_per_s / (devices * peak)`` with
  :func:`qdelta_jax.train.loop.flops_per_token` (6 x matmul params + the Q-Delta op) and the
  device's dense bf16 peak (half of it for float32, i.e. TF32; ``--peak-tflops`` overrides;
  unknown devices such as CPUs report no MFU). The first step (compilation) is left out of the
  summary's averages.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train import data as data_mod
from qdelta_jax.train import loop
from qdelta_jax.train import sharding as shd
from qdelta_jax.train.evaluate import Evaluator
from qdelta_jax.train.options import (
    PER_INVOCATION,
    RESUME_SENSITIVE,
    TrainArgs,
    UsageError,
    make_sources,
    open_text,
    validate,
)


class BadStepsError(RuntimeError):
    """Too many consecutive non-finite steps."""


class RunIOError(RuntimeError):
    """A file-system failure (disk full, read-only or missing path, unreadable file), as one
    line: what failed, where, and what to do. The CLI prints it and exits with 1."""


# A step's loss "blew up" above this multiple of ln(vocab_size), the loss of a uniform guess
# (a freshly initialised model starts near ln(vocab_size)).
BLOWUP_FACTOR = 2.0


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"hidden_size=128,num_hidden_layers=4"`` -> dict, values parsed as JSON when possible."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for part in text.split(","):
        if "=" not in part:
            raise UsageError(f"--model-overrides: expected KEY=VALUE pairs, got {part!r}",
                             "--model-overrides")
        k, v = (s.strip() for s in part.split("=", 1))
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _round_up(n: int, m: int) -> int:
    return m * ((n + m - 1) // m)


def model_config_for(a: TrainArgs, data_vocab: int, pretokenised: bool):
    """The model config of a run: the preset, the task's vocabulary (rounded up to a multiple of
    64; for pre-tokenised text at least the preset's) and the ablation/dtype flags."""
    from qdelta_jax.model import PRESETS, QDeltaConfig

    vocab = _round_up(data_vocab, 64)
    if pretokenised:
        vocab = max(vocab, PRESETS[a.preset].get("vocab_size", 0))
    fields: dict[str, Any] = {"vocab_size": vocab, "compute_dtype": a.dtype,
                              "param_dtype": a.param_dtype}
    if a.implementation is not None:
        fields["implementation"] = a.implementation
    if a.save_residuals is not None:
        fields["save_residuals"] = a.save_residuals
    if a.fixed_lam is not None:
        fields["fixed_lam"] = float(a.fixed_lam)
    if a.no_decay_gate:
        fields["use_decay"] = False
    if a.remat:
        fields["remat"] = True
    fields.update(parse_overrides(a.model_overrides))
    if a.init_from is not None:  # the model comes from there; only how it runs can change
        from qdelta_jax.train.params import init_config

        fields.pop("vocab_size")
        source = a.init_from
        if not Path(source).is_dir() and a.run_dir and (
                Path(a.run_dir) / ckpt.CONFIG_FILE).is_file():
            source = a.run_dir  # resuming: the run holds the model config it started from
        try:
            return init_config(source, data_vocab=data_vocab, fields=fields)
        except (ckpt.RunDirError, ValueError, TypeError) as e:
            raise UsageError(str(e), "--init-from") from None
    if fields["vocab_size"] < data_vocab:
        raise UsageError(f"--model-overrides vocab_size {fields['vocab_size']} is below the "
                         f"{data_vocab} token ids of the data", "--model-overrides")
    try:
        return QDeltaConfig.from_preset(a.preset, **fields)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--model-overrides: bad model config: {e}",
                         "--model-overrides") from None


def data_vocab_of(a: TrainArgs, text_tokens) -> tuple[int, bool]:
    if a.task == "mqar":
        return a.mqar_vocab, False
    if a.task == "niah":
        return 256, False
    _, _, vocab = text_tokens
    # A tokenizer (given, or the one of a qdelta-tokenize folder) fixes the vocabulary; bare
    # pre-tokenised ids only bound it from below.
    if a.tokenizer is not None or (data_mod.is_shard_folder(a.data)
                                   and data_mod.read_manifest(a.data) is not None):
        return vocab, False
    return vocab, Path(a.data).suffix in (".bin", ".npy") or data_mod.is_shard_folder(a.data)


def copy_tokenizer(a: TrainArgs, run_dir: Path) -> None:
    """Copies the run's tokenizer (``--tokenizer``, or the one of a ``qdelta-tokenize``
    folder) to ``RUN_DIR/tokenizer.json``, where ``qdelta-eval`` and ``qdelta-generate`` find
    it. A run directory holding another tokenizer is refused: its checkpoints read tokens of
    that one."""
    import shutil

    from qdelta_jax.train.tokenize import TOKENIZER_COPY

    src = data_mod.tokenizer_file(a.data, a.tokenizer) if a.task == "text" else None
    if src is None:
        return
    dst = run_dir / TOKENIZER_COPY
    if dst.exists():
        if dst.read_bytes() != src.read_bytes():
            raise UsageError(f"--tokenizer {src} differs from {dst}, the tokenizer this run was "
                             "started with; use a new --run-dir", "--tokenizer")
        return
    shutil.copyfile(src, dst)


class Session:
    """Model, optimizer, mesh and compiled steps of a run (shared by training and the
    benchmarks).

    The pure steps of :mod:`.loop` are jitted here, in one place, with their shardings: the
    train step donates the old state, the eval step is :class:`~.evaluate.Evaluator`'s. Both
    are traced under ``jax.set_mesh(mesh)`` so that the Pallas op splits the batch per device
    (``qdelta_rule``'s ``batch_axes``).
    """

    def __init__(self, a: TrainArgs, model_cfg, mesh):
        from flax import nnx

        from qdelta_jax.model import QDeltaLM

        a = a.resolved()
        self.args, self.model_cfg, self.mesh = a, model_cfg, mesh
        self.fns = loop.ModelFns(lambda: QDeltaLM(model_cfg, rngs=nnx.Rngs(a.seed)))
        self.ocfg = loop.OptimConfig(lr=a.lr, warmup=a.warmup, steps=a.steps,
                                     weight_decay=a.weight_decay, grad_accum=a.grad_accum)
        # bfloat16 params: the optimizer keeps a float32 master copy of them.
        self.tx = loop.make_optimizer(self.ocfg,
                                      float32_master=model_cfg.param_dtype != "float32")
        # Parameters (and the optimizer state that mirrors them) are laid out by their logical
        # axis names (shd.LOGICAL_RULES).
        axes = shd.logical_axes(nnx.eval_shape(self.fns.make_model))
        self.param_shardings = shd.tree_shardings(mesh, self.fns.abstract_params, axes)
        abstract = jax.eval_shape(
            lambda p: loop.init_train_state(p, self.tx, a.seed), self.fns.abstract_params
        )
        self.state_shardings = shd.tree_shardings(mesh, abstract, axes)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract, self.state_shardings,
        )
        self.batch_sharding = shd.batch_sharding(mesh)  # every array of a batch, by its rows
        self.repl = shd.replicated(mesh)

        self._init_state = jax.jit(lambda p: loop.init_train_state(p, self.tx, a.seed),
                                   out_shardings=self.state_shardings)
        self._train_step = jax.jit(
            loop.make_train_step(self.fns, self.tx, a.grad_accum, loop.lr_schedule(self.ocfg),
                                 a.train_accuracy),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.repl),
            donate_argnums=0,
        )
        self.evaluator = Evaluator(self.fns, mesh, self.state_shardings.params)

    def init_state(self, params=None) -> loop.TrainState:
        """A fresh train state from ``params`` (``None``: the model's initialisation)."""
        if params is None:
            params = self.fns.init(self.param_shardings)
        return self._init_state(params)

    def restore_rest(self) -> None:
        """Materialises the model's non-param state (none for QDeltaLM) without keeping params."""
        if jax.tree.leaves(self.fns.abstract_rest):
            self.fns.init(self.param_shardings)

    def train_step(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self._train_step(state, batch)

    def eval_step(self, params, batch):
        return self.evaluator.eval_step(params, batch)

    def evaluate(self, params, source, n_batches: int) -> dict[str, float]:
        return self.evaluator(params, source, n_batches)


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` (and TensorBoard when tensorboardX exists)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.f = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def default_run_dir(a: TrainArgs) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{a.task}-{a.preset}-{stamp}")


def _to_float(x):
    x = float(x)
    return x if math.isfinite(x) else None if math.isnan(x) else x


def _model_identity(model: dict[str, Any]) -> dict[str, Any]:
    """A model config's keys that must match to resume it."""
    return {k: v for k, v in model.items() if k != "save_residuals"}


def run(a: TrainArgs, *, log=print) -> dict[str, Any]:
    """Trains as ``a`` says (see :func:`_run`). A file-system failure raises
    :class:`RunIOError` (one line: what, where, what to do)."""
    phase = _Phase()
    try:
        return _run(a, log=log, phase=phase)
    except (UsageError, BadStepsError, KeyboardInterrupt):
        raise
    except Exception as e:
        msg = describe_io_error(e, phase.what, phase.resume)
        if msg is None:
            raise
        raise RunIOError(msg) from e


class _Phase:
    """What the run is doing (for file-system error messages) and how to resume it."""

    def __init__(self):
        self.what = "starting the run"
        self.resume = ""


_IO_FIXES = {
    errno.ENOSPC: "the disk is full: free space there (or use a --run-dir on another disk)",
    errno.EDQUOT: "the disk quota is exhausted: free space (or use a --run-dir elsewhere)",
    errno.EROFS: "the file system is read-only: use a --run-dir on a writable disk",
    errno.EACCES: "permission denied: make it writable (readable) for you, or use another path",
    errno.EPERM: "operation not permitted: make it writable for you, or use another path",
    errno.ENOENT: "a folder on the path does not exist (deleted while running?)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EIO: "an I/O error: check the disk",
}


def describe_io_error(err: BaseException, what: str, resume: str = "") -> str | None:
    """One line for a file-system failure found in ``err`` or its causes (an ``OSError``, or
    an Orbax/TensorStore error carrying ``os_error_code``), else None."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        code, where = None, None
        if isinstance(e, OSError) and e.errno:
            code, where = e.errno, e.filename
        else:
            text = str(e)
            m = re.search(r"os_error_code='?(\d+)", text)
            if m:
                code = int(m.group(1))
                f = re.findall(r'"(/[^"]+)"', text)
                where = f[-1] if f else None
        if code is not None:
            if where and ".orbax-checkpoint-tmp" in where:  # Orbax's internal file names
                where = where.split(".orbax-checkpoint-tmp")[0]
            m = re.search(r"/checkpoints/(\d+)$", where or "")
            if m:  # an asynchronous save fails when the next one starts: name its step
                what = re.sub(r"^saving checkpoint step \d+", f"saving checkpoint step {m[1]}",
                              what)
            fix = _IO_FIXES.get(code, os.strerror(code))
            at = f" ({where})" if where else ""
            tail = f"; then {resume}" if resume else ""
            return f"{what} failed{at}: {os.strerror(code)}. {fix[0].upper()}{fix[1:]}{tail}"
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def _healthy(rec: dict, limit: float) -> tuple[bool, str]:
    loss, gnorm = rec.get("loss"), rec.get("grad_norm")
    if loss is None or gnorm is None or not (math.isfinite(loss) and math.isfinite(gnorm)):
        return False, f"step {rec['step']}: loss or gradient norm not finite"
    if loss > limit:
        return False, (f"step {rec['step']}: loss {loss:.4g} above {limit:.3g} "
                       f"({BLOWUP_FACTOR:g} x ln(vocab))")
    return True, ""


class _Judge:
    """Marks checkpoints good or bad. Checkpoint ``s`` holds the params that step ``s + 1``
    computes its loss with, so it is judged when that step's metrics arrive (the final one by
    the final evaluation): good when every step after the previous checkpoint up to ``s + 1``
    had a finite loss and gradient norm and a loss at most ``BLOWUP_FACTOR * ln(vocab)``. A
    checkpoint whose window already holds a bad step is marked bad at once."""

    def __init__(self, checkpointer, limit: float, step0: int):
        self.ckpt, self.limit = checkpointer, limit
        self.pending: list[int] = []  # saved, waiting for the step after them
        h = checkpointer.health.get(step0) if step0 else None
        if step0 and (h is None or h.get("good") is None):
            if h is not None and not h.get("window_ok", True):
                checkpointer.mark(step0, False, h.get("why", ""))
            else:
                self.pending.append(step0)
        self.window_ok, self.why = True, ""  # the steps after the newest checkpoint so far

    def saved(self, step: int) -> None:
        if self.window_ok:
            self.pending.append(step)
            self.ckpt.mark(step, None)
        else:
            self.ckpt.mark(step, False, self.why)
        self.window_ok, self.why = True, ""

    def step_done(self, rec: dict) -> None:
        ok, why = _healthy(rec, self.limit)
        step = rec["step"]
        # Checkpoints saved before this step are judged by it; one saved at this very step
        # (its metrics arrive after the save) has it in its window, so a bad step condemns it.
        judged = [s for s in self.pending if s < step or not ok]
        for s in judged:
            self.ckpt.mark(s, ok, why)
        if not ok and not any(s >= step for s in judged):
            if self.window_ok:
                self.why = why
            self.window_ok = False
        self.pending = [s for s in self.pending if s not in judged]

    def final(self, step: int, eval_loss: float) -> None:
        """Judges the checkpoint of the last step by the final evaluation's loss."""
        if step in self.pending:
            ok, why = _healthy({"step": step, "loss": eval_loss, "grad_norm": 0.0}, self.limit)
            self.ckpt.mark(step, ok, why.replace(f"step {step}:", f"step {step} evaluation:"))
            self.pending.remove(step)


def _trim_metrics(run_dir: Path, step0: int) -> int:
    """Moves the ``metrics.jsonl`` lines of steps after ``step0`` (computed again by this
    resumed run) and unreadable lines (cut off by a kill) to ``superseded/``; returns their
    count."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line)
            ok = line.endswith("\n") and int(rec["step"]) <= step0
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else drop).append(line if line.endswith("\n") else line + "\n")
    if drop:
        side = run_dir / "superseded"
        side.mkdir(exist_ok=True)
        with open(side / f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl", "a") as f:
            f.writelines(drop)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return len(drop)


def _diverged_message(step: int, why: str, run_dir: Path, last_good: int | None) -> str:
    if last_good is None:
        return (f"{why}. No checkpoint of {run_dir} is marked good: start over with a new "
                "--run-dir and a lower --lr (or check the data, or try --dtype float32).")
    return (f"{why}. The last good checkpoint is step {last_good}: resume from it with "
            f"qdelta-train --run-dir {run_dir} --resume-from {last_good} and a lower --lr "
            "(or check the data, or try --dtype float32).")


def _run(a: TrainArgs, *, log=print, phase: _Phase | None = None) -> dict[str, Any]:
    """Trains (or resumes) a run; returns the summary dict. Raises :class:`UsageError` for bad
    options and :class:`BadStepsError` when ``max_bad_steps`` consecutive steps were not
    finite. The phases: setup (options, data, model config, mesh, run directory), restore or
    init, the loop, the summary."""
    phase = phase or _Phase()
    t_start = time.perf_counter()
    s = _setup(a, log, phase)
    sess = Session(s.args, s.model_cfg, s.mesh)
    phase.what = f"opening the checkpoints in {s.run_dir / 'checkpoints'}"
    checkpointer = ckpt.Checkpointer(s.run_dir)
    try:
        step0, state, it = _restore_or_init(s, sess, checkpointer, log, phase)
    except BaseException:
        checkpointer.close()
        raise
    if s.main_process:
        phase.what = f"updating {s.run_dir / 'metrics.jsonl'}"
        _trim_metrics(s.run_dir, step0)
    phase.resume = f"rerun with --run-dir {s.run_dir} to resume from the last checkpoint"

    a, cfg, mesh = s.args, s.model_cfg, s.mesh
    n_params = loop.count_params(sess.fns.abstract_params)
    rate = _Throughput.of(sess, a)
    log(f"run dir {s.run_dir}: {a.task}, preset {a.preset} ({n_params / 1e6:.2f}M params, vocab "
        f"{cfg.vocab_size}), batch {a.batch_size} x {a.seq_len}, mesh data={mesh.shape['data']} "
        f"fsdp={mesh.shape['fsdp']} on {rate.devices} {rate.device_kind}, steps {step0} -> "
        f"{a.steps}")
    train = _TrainLoop(s, sess, checkpointer, step0, rate, phase)
    train.run(state, it)
    return _write_summary(s, train, n_params, rate, time.perf_counter() - t_start, phase)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What a run's options decide before any state exists."""

    args: TrainArgs  # resolved, with the run directory filled in
    model_cfg: Any
    mesh: Any
    run_dir: Path
    train_src: Any
    eval_src: Any
    rows: np.ndarray | None  # this process's rows of the global batch (None: one process)
    main_process: bool


def _setup(a: TrainArgs, log, phase: _Phase) -> _Setup:
    """Checks the options, opens the data, builds the model config and the mesh, and opens the
    run directory (:func:`_open_run_dir`)."""
    validate(a)
    a = a.resolved()
    shd.maybe_initialize_distributed()
    phase.what = f"reading --data {a.data}"
    text_tokens = open_text(a)
    train_src, eval_src = make_sources(a, text_tokens=text_tokens)
    model_cfg = model_config_for(a, *data_vocab_of(a, text_tokens))
    try:
        mesh = shd.make_mesh(a.mesh)
        shd.check_batch_size(a.batch_size, mesh, a.grad_accum)
    except shd.MeshError as e:
        raise UsageError(str(e), "--mesh") from None
    main_process = jax.process_index() == 0
    a = dataclasses.replace(a, run_dir=str(Path(a.run_dir or default_run_dir(a))))
    _open_run_dir(a, model_cfg, main_process, log, phase)
    # Each process reads only the rows of the global batch that its devices hold.
    rows = shd.process_rows(mesh, a.batch_size) if jax.process_count() > 1 else None
    return _Setup(a, model_cfg, mesh, Path(a.run_dir), train_src, eval_src, rows, main_process)


def _open_run_dir(a: TrainArgs, model_cfg, main_process: bool, log, phase: _Phase) -> None:
    """Creates ``a.run_dir`` with its ``config.json`` (the model config and the options), or
    checks an existing one: it must hold the same model; options that make a resumed run differ
    from an uninterrupted one are warned about; the saved options are rewritten when they
    changed."""
    run_dir = Path(a.run_dir)
    phase.what = f"opening --run-dir {run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} exists and is not a directory", "--run-dir")
    try:
        saved = ckpt.read_run_config(run_dir) if run_dir.exists() else None
    except ckpt.RunDirError as e:
        raise UsageError(str(e), "--run-dir") from None
    requested = {"model": model_cfg.to_dict(), "train": a.to_dict()}
    if saved is None and run_dir.exists() and (run_dir / "checkpoints").exists():
        raise UsageError(f"--run-dir {run_dir} has checkpoints but no {ckpt.CONFIG_FILE}; "
                         "it is not a run directory this program can resume", "--run-dir")
    rewrite = False
    if saved is not None:
        try:
            # save_residuals changes memory and speed, not the model: a resume may change it.
            ckpt.check_model_config(run_dir, _model_identity(saved.get("model", {})),
                                    _model_identity(requested["model"]))
        except ckpt.RunDirError as e:
            raise UsageError(str(e), "--run-dir") from None
        diffs = ckpt.diff_dicts({k: saved.get("train", {}).get(k) for k in RESUME_SENSITIVE},
                                {k: requested["train"].get(k) for k in RESUME_SENSITIVE})
        if diffs:
            log("warning: resuming with different training options (a resumed run then differs "
                "from an uninterrupted one):\n  " + "\n  ".join(diffs))
        sticky = [k for k in requested["train"] if k not in PER_INVOCATION]
        rewrite = any(saved["train"].get(k) != requested["train"][k] for k in sticky)
    if main_process:
        phase.what = f"writing {run_dir / ckpt.CONFIG_FILE}"
        run_dir.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(a, run_dir)
        ckpt.write_run_config(run_dir, requested, overwrite=rewrite)


def _restore_or_init(s: _Setup, sess: Session, checkpointer: ckpt.Checkpointer, log,
                     phase: _Phase) -> tuple[int, loop.TrainState, data_mod.DataIterator]:
    """``(step0, state, data iterator at step0)``: the checkpoint of ``--resume-from`` (the newer
    ones set aside), else the newest one that reads back (refused when it is marked bad after a
    divergence), else a fresh state from ``--init-from``'s parameters or the model's
    initialisation."""
    a = s.args
    phase.what = f"restoring a checkpoint from {s.run_dir / 'checkpoints'}"
    try:
        steps = checkpointer.steps()
        if a.resume_from is not None:
            restored = checkpointer.restore_step(a.resume_from, sess.abstract_state.to_dict())
            moved = checkpointer.set_aside_after(a.resume_from)
            if moved is not None:
                log(f"moved the checkpoints after step {a.resume_from} to {moved}")
        elif steps and checkpointer.is_bad(steps[-1]):
            raise ckpt.RunDirError(_diverged_message(
                steps[-1], f"the newest checkpoint, step {steps[-1]}, is marked bad "
                f"({checkpointer.health[steps[-1]].get('why')})", s.run_dir,
                checkpointer.last_good()))
        else:
            restored = checkpointer.restore_latest(sess.abstract_state.to_dict())
    except ckpt.RunDirError as e:
        raise UsageError(str(e), e.flag) from None
    it = data_mod.DataIterator(s.train_src, rows=s.rows)
    if restored is not None:
        step0, state_dict, data_state = restored
        it.load_state_dict(data_state)
        sess.restore_rest()
        log(f"resumed {s.run_dir} from step {step0}")
        return step0, loop.TrainState.from_dict(state_dict), it
    params = None
    if a.init_from is not None:
        from qdelta_jax.train.params import restore_params

        phase.what = f"reading --init-from {a.init_from}"
        try:
            got, params = restore_params(a.init_from, s.model_cfg,
                                         shardings=sess.param_shardings, flag="--init-from")
        except ckpt.RunDirError as e:
            raise UsageError(str(e), "--init-from") from None
        log(f"initialised from {a.init_from} (step {got})")
    return 0, sess.init_state(params), it


@dataclasses.dataclass(frozen=True)
class _Throughput:
    """What turns a step time into tokens/s and MFU (see the module docstring)."""

    tokens_per_step: int
    flops_per_token: float
    devices: int
    device_kind: str
    peak: float | None  # FLOP/s of one device; None where unknown (no MFU)

    @classmethod
    def of(cls, sess: Session, a: TrainArgs) -> _Throughput:
        kind = jax.devices()[0].device_kind
        return cls(a.batch_size * a.seq_len,
                   loop.flops_per_token(sess.fns.abstract_params, sess.model_cfg, a.seq_len),
                   sess.mesh.size, kind, loop.peak_flops(kind, a.dtype, a.peak_tflops))

    def mfu(self, tokens_per_s: float | None) -> float | None:
        if not (self.peak and tokens_per_s):
            return None
        return self.flops_per_token * tokens_per_s / (self.devices * self.peak)


class _TrainLoop:
    """The steps of one invocation, from ``step0`` to ``--steps`` (or ``--stop-after``, or a
    stop signal). Step ``i + 1`` is dispatched before step ``i``'s metrics are read, so the host
    prepares data and logs while the device computes. Each step's metrics go to
    ``metrics.jsonl`` and the progress bar and judge the checkpoints before them
    (:class:`_Judge`); checkpoints every ``--save-every`` steps and at the end, evaluations
    every ``--eval-every`` steps and at the end. Afterwards ``status`` is ``done``,
    ``stopped`` (``--stop-after``) or ``interrupted`` (a signal), ``step`` the last step."""

    def __init__(self, s: _Setup, sess: Session, checkpointer: ckpt.Checkpointer, step0: int,
                 rate: _Throughput, phase: _Phase):
        self.s, self.sess, self.ckpt, self.rate, self.phase = s, sess, checkpointer, rate, phase
        self.step0 = self.step = step0
        self.status = "done"
        self.last_metrics: dict[str, Any] = {}
        self.last_eval: dict[str, Any] | None = None
        self.step_times: list[float] = []  # the first step (compilation) left out
        self.writer = MetricsWriter(s.run_dir, s.main_process)
        self.judge = _Judge(checkpointer,
                            BLOWUP_FACTOR * math.log(max(s.model_cfg.vocab_size, 2)), step0)
        self.pbar = None
        if s.args.progress and s.main_process:
            from tqdm import tqdm

            # In a log file (not a terminal) redraw rarely, so the bar does not flood it.
            self.pbar = tqdm(total=s.args.steps, initial=step0, desc="train", dynamic_ncols=True,
                             file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.stability = None
        if s.args.diagnostics:  # compiled once for the run
            from qdelta_jax import diagnostics

            self.stability = diagnostics.params_summary_fn(sess.fns)
        self.t_prev = time.perf_counter()

    def run(self, state: loop.TrainState, it: data_mod.DataIterator) -> None:
        a, mesh, rows = self.s.args, self.s.mesh, self.s.rows
        stop_at = a.steps if a.stop_after is None else min(a.steps, self.step0 + a.stop_after)
        pending = None  # (step number, metrics still on the device)
        self.phase.what = f"training (step {self.step0})"
        self.t_prev = time.perf_counter()
        try:
            with ckpt.StopSignal(multi_process=jax.process_count() > 1) as stop:
                step = self.step0
                while step < stop_at:
                    batch = shd.shard_batch(next(it), mesh, rows, a.batch_size)
                    state, metrics = self.sess.train_step(state, batch)
                    step += 1
                    self.step = step
                    if pending is not None:
                        self._consume(*pending)
                    pending = (step, metrics)
                    if a.save_every and step % a.save_every == 0 and step < a.steps:
                        self._save(step, state)
                    if a.eval_every and step % a.eval_every == 0 and step < a.steps:
                        self._consume(*pending)
                        pending = None
                        self._evaluate(step, state)
                    if stop.should_stop(step):
                        self.status = "interrupted"
                        break
                if pending is not None:
                    self._consume(*pending)
                if step < a.steps and self.status == "done":
                    self.status = "stopped"
                self._save(step, state)
                if self.status == "done":
                    self._evaluate(step, state)
                    self.judge.final(step, self.last_eval["loss"])
        except BadStepsError:
            self.ckpt.wait()
            raise
        finally:
            self._close()

    def _consume(self, step: int, m) -> None:
        """Writes step ``step``'s metrics (waiting for the device) and judges them."""
        a = self.s.args
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, self.t_prev = now - self.t_prev, now
        tps = self.rate.tokens_per_step / dt
        rec = {
            "step": step,
            "loss": _to_float(m["loss"]),
            **({"accuracy": float(m["accuracy"])} if "accuracy" in m else {}),
            "grad_norm": _to_float(m["grad_norm"]),
            "lr": float(m["lr"]),
            "skipped": int(m["skipped"]),
            "step_time_s": dt,
            "tokens_per_s": tps,
            "mfu": self.rate.mfu(tps),
        }
        if step > self.step0 + 1:
            self.step_times.append(dt)
        self.last_metrics = rec
        self.writer.write(rec)
        self.judge.step_done(rec)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{tps:,.0f}",
                                  refresh=False)
            self.pbar.update(1)
        if int(m["bad_steps"]) >= a.max_bad_steps:
            raise BadStepsError(_diverged_message(
                step, f"stopping at step {step}: {int(m['bad_steps'])} consecutive steps had a "
                f"non-finite loss or gradient norm (--max-bad-steps {a.max_bad_steps}); their "
                "updates were skipped", self.s.run_dir, self.ckpt.last_good()))
        if not bool(m["finite"]) and self.pbar is not None:
            self.pbar.write(f"step {step}: non-finite loss or gradient norm; update skipped "
                            f"({int(m['bad_steps'])} in a row)")

    def _save(self, step: int, state: loop.TrainState) -> None:
        self.phase.what = f"saving checkpoint step {step} to {self.ckpt.dir}"
        if self.ckpt.save(step, state.to_dict(), {"index": int(step)}):
            self.judge.saved(step)
        self.phase.what = f"training (step {step})"

    def _evaluate(self, step: int, state: loop.TrainState) -> None:
        a = self.s.args
        ev = self.sess.evaluate(state.params, self.s.eval_src, a.eval_batches)
        if self.stability is not None:  # beta * c of docs/MATH.md section 1, first eval batch
            from qdelta_jax import diagnostics

            ev["stability"] = diagnostics.compact(self.stability(state.params,
                                                                 self.s.eval_src.batch(0)))
        self.last_eval = ev
        self.t_prev = time.perf_counter()  # keep evaluation time out of the next step's time
        self.writer.write({"step": step, "split": "eval", **ev})
        if self.pbar is not None:
            self.pbar.write(f"step {step}: {format_eval(ev, a.task)}")

    def _close(self) -> None:
        """Closes the progress bar, finishes the checkpoint writes, prunes old checkpoints and
        closes the files (also after an error, which then keeps naming what failed)."""
        if self.pbar is not None:
            self.pbar.close()
        if sys.exc_info()[0] is None:
            self.phase.what = f"finishing the checkpoint writes in {self.ckpt.dir}"
        try:
            self.ckpt.wait()
            self.ckpt.prune()
        finally:
            self.ckpt.close()
            self.writer.close()


def _write_summary(s: _Setup, train: _TrainLoop, n_params: int, rate: _Throughput,
                   wall: float, phase: _Phase) -> dict[str, Any]:
    """The run's summary (also ``RUN_DIR/summary.json``): how it ended, the last loss and
    evaluation, the checkpoints' health, throughput (the mean step after the first), and the
    options it ran with."""
    a = s.args
    mean_dt = float(np.mean(train.step_times)) if train.step_times else None
    tps = rate.tokens_per_step / mean_dt if mean_dt else None
    summary = {
        "status": train.status,
        "task": a.task,
        "run_dir": str(s.run_dir),
        "step": int(train.step),
        "steps": a.steps,
        "loss": train.last_metrics.get("loss"),
        "eval": train.last_eval,
        "skipped_steps": train.last_metrics.get("skipped"),
        "last_good_step": train.ckpt.last_good(),
        "final_checkpoint_bad": train.ckpt.is_bad(train.step),
        "params": n_params,
        "step_time_s": mean_dt,
        "tokens_per_s": tps,
        "mfu": rate.mfu(tps),
        "flops_per_token": rate.flops_per_token,
        "devices": rate.devices,
        "device_kind": rate.device_kind,
        "wall_s": wall,
        "options": a.to_dict(),
    }
    if s.main_process:
        phase.what = f"writing {s.run_dir / 'summary.json'}"
        with open(s.run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def format_eval(ev: dict[str, Any], task: str | None, summary: bool = False) -> str:
    """An evaluation as one phrase: text runs give loss, perplexity and bits per byte (when
    the bytes are known), the recall tasks loss, recall accuracy and exact match."""
    if task == "text":
        out = f"eval loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}"
        if ev.get("bits_per_byte") is not None:
            out += f", bits per byte {ev['bits_per_byte']:.4f}"
        return out
    if summary:
        return (f"eval loss {ev['loss']:.4f}, recall accuracy {ev['accuracy']:.4f}, exact match "
                f"{ev['exact_match']:.4f}")
    return (f"eval loss {ev['loss']:.4f} accuracy {ev['accuracy']:.4f} exact "
            f"{ev['exact_match']:.4f}")


def format_summary(s: dict[str, Any]) -> str:
    parts = [f"{s['status']} at step {s['step']}/{s['steps']}"]
    if s.get("loss") is not None:
        parts.append(f"loss {s['loss']:.4f}")
    if s.get("eval"):
        parts.append(format_eval(s["eval"], s.get("task"), summary=True))
    if s.get("step_time_s"):
        parts.append(f"step {s['step_time_s'] * 1e3:.1f} ms, {s['tokens_per_s']:,.0f} tokens/s")
    if s.get("mfu") is not None:
        parts.append(f"MFU {100 * s['mfu']:.1f}% of {s['devices']} x {s['device_kind']}")
    parts.append(f"wall {s['wall_s']:.1f} s")
    return "; ".join(parts)
