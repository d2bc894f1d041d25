"""The training driver behind ``qdelta-train``: builds the data, model, mesh, optimizer and
checkpoints from :class:`TrainArgs`, runs the loop and writes metrics.

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


class UsageError(ValueError):
    """A bad option value; ``flag`` names the option. The CLI prints it and exits with 2."""

    def __init__(self, message: str, flag: str | None = None):
        super().__init__(message)
        self.flag = flag


class BadStepsError(RuntimeError):
    """Too many consecutive non-finite steps."""


class RunIOError(RuntimeError):
    """A file-system failure (disk full, read-only or missing path, unreadable file), as one
    line: what failed, where, and what to do. The CLI prints it and exits with 1."""


# A step's loss "blew up" above this multiple of ln(vocab_size), the loss of a uniform guess
# (a freshly initialised model starts near ln(vocab_size)).
BLOWUP_FACTOR = 2.0


# Per-task defaults of --seq-len and --batch-size (None in TrainArgs).
TASK_SEQ_LEN = {"mqar": 64, "niah": 512, "text": 512}
TASK_BATCH = {"mqar": 128, "niah": 16, "text": 16}


@dataclasses.dataclass
class TrainArgs:
    """Every option of ``qdelta-train`` (the CLI flag is the field name with dashes)."""

    preset: str = "tiny"
    task: str = "mqar"
    data: str | None = None
    steps: int = 200
    batch_size: int | None = None  # None: TASK_BATCH[task]
    seq_len: int | None = None  # None: TASK_SEQ_LEN[task]
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    save_every: int = 100
    eval_every: int = 50
    eval_batches: int = 4
    run_dir: str | None = None
    mesh: str | None = None
    seed: int = 0
    num_pairs: int = 4
    mqar_vocab: int = 64
    niah_variant: str = "passkey"
    eos_id: int | None = None
    tokenizer: str | None = None
    grad_accum: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    train_accuracy: bool = False
    implementation: str | None = None
    fixed_lam: float | None = None
    no_decay_gate: bool = False
    remat: bool = False
    save_residuals: bool | None = None
    model_overrides: str | None = None
    max_bad_steps: int = 10
    stop_after: int | None = None
    resume_from: int | None = None
    peak_tflops: float | None = None
    progress: bool = True
    diagnostics: bool = False
    init_from: str | None = None

    def resolved_seq_len(self) -> int:
        return int(self.seq_len if self.seq_len is not None else TASK_SEQ_LEN.get(self.task, 512))

    def resolved(self) -> TrainArgs:
        """A copy with the per-task defaults of ``seq_len`` and ``batch_size`` filled in."""
        return dataclasses.replace(
            self,
            seq_len=self.resolved_seq_len(),
            batch_size=int(self.batch_size if self.batch_size is not None
                           else TASK_BATCH.get(self.task, 16)),
        )


# Options whose change between invocations changes what a resumed run computes.
_RESUME_SENSITIVE = ("task", "data", "seed", "batch_size", "seq_len", "num_pairs", "mqar_vocab",
                     "niah_variant", "eos_id", "tokenizer", "grad_accum", "lr", "warmup", "steps",
                     "weight_decay")

# Options that belong to one invocation: not reused from a run directory's saved options.
PER_INVOCATION = ("run_dir", "stop_after", "resume_from", "progress")


def validate(a: TrainArgs) -> None:
    from qdelta_jax.model import DTYPES, PRESETS

    def need(cond, flag, msg):
        if not cond:
            raise UsageError(f"{flag} {msg}", flag)

    need(a.preset in PRESETS, "--preset", f"{a.preset!r} is unknown; presets: "
         + ", ".join(sorted(PRESETS)))
    need(a.task in data_mod.TASKS, "--task", f"{a.task!r} is unknown; tasks: "
         + ", ".join(data_mod.TASKS))
    need(a.steps >= 1, "--steps", f"must be >= 1, got {a.steps}")
    a = a.resolved()
    need(a.batch_size >= 1, "--batch-size", f"must be >= 1, got {a.batch_size}")
    need(a.seq_len is None or a.seq_len >= 2, "--seq-len", f"must be >= 2, got {a.seq_len}")
    need(math.isfinite(a.lr) and a.lr > 0, "--lr", f"must be a positive number, got {a.lr}")
    need(a.warmup >= 0, "--warmup", f"must be >= 0, got {a.warmup}")
    need(a.weight_decay >= 0, "--weight-decay", f"must be >= 0, got {a.weight_decay}")
    need(a.save_every >= 0, "--save-every", f"must be >= 0 (0: only at the end), got "
         f"{a.save_every}")
    need(a.eval_every >= 0, "--eval-every", f"must be >= 0 (0: only at the end), got "
         f"{a.eval_every}")
    need(a.eval_batches >= 1, "--eval-batches", f"must be >= 1, got {a.eval_batches}")
    need(a.grad_accum >= 1, "--grad-accum", f"must be >= 1, got {a.grad_accum}")
    need(a.batch_size % a.grad_accum == 0, "--grad-accum",
         f"{a.grad_accum} must divide --batch-size {a.batch_size}")
    need(a.max_bad_steps >= 1, "--max-bad-steps", f"must be >= 1, got {a.max_bad_steps}")
    need(a.stop_after is None or a.stop_after >= 1, "--stop-after",
         f"must be >= 1, got {a.stop_after}")
    need(a.resume_from is None or a.resume_from >= 1, "--resume-from",
         f"must be a saved step >= 1, got {a.resume_from}")
    need(a.resume_from is None or a.run_dir is not None, "--resume-from",
         "needs --run-dir (the run to resume)")
    need(a.dtype in DTYPES, "--dtype", f"must be one of {', '.join(DTYPES)}, got {a.dtype!r}")
    need(a.param_dtype in DTYPES, "--param-dtype",
         f"must be one of {', '.join(DTYPES)}, got {a.param_dtype!r}")
    from qdelta_jax.ops import IMPLEMENTATIONS

    need(a.implementation in (None, *IMPLEMENTATIONS), "--implementation",
         f"must be one of {', '.join(IMPLEMENTATIONS)}, got {a.implementation!r}")
    need(a.save_residuals is None or a.implementation is None
         or a.implementation.startswith("pallas"), "--no-save-residuals",
         f"applies to the pallas implementation only, not --implementation {a.implementation}")
    need(a.fixed_lam is None or math.isfinite(a.fixed_lam), "--fixed-lam",
         f"must be a finite number, got {a.fixed_lam}")
    need(a.num_pairs >= 1, "--num-pairs", f"must be >= 1, got {a.num_pairs}")
    need(a.mqar_vocab >= 8, "--mqar-vocab", f"must be >= 8, got {a.mqar_vocab}")
    need(a.task != "text" or a.data is not None, "--data",
         "is required with --task text (a UTF-8 file or folder, a .bin or a .npy token file)")
    need(a.data is None or a.task == "text", "--data",
         f"is only read by --task text (got --task {a.task}); add --task text or drop --data")
    need(a.eos_id is None or a.task == "text", "--eos-id",
         f"applies to --task text only (got --task {a.task})")
    need(a.tokenizer is None or a.task == "text", "--tokenizer",
         f"applies to --task text only (got --task {a.task})")
    if a.data is not None and not Path(a.data).exists():
        raise UsageError(f"--data {a.data}: no such file or directory", "--data")


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


def make_sources(a: TrainArgs, batch_size: int | None = None, seq_len: int | None = None,
                 text_tokens=None, depth=None):
    T = seq_len or a.resolved_seq_len()
    B = batch_size or a.batch_size
    kw = dict(batch_size=B, seq_len=T, seed=a.seed, num_pairs=a.num_pairs,
              mqar_vocab=a.mqar_vocab, niah_variant=a.niah_variant, data=a.data,
              eos_id=a.eos_id, text_tokens=text_tokens, depth=depth, tokenizer=a.tokenizer)
    try:
        return (data_mod.make_source(a.task, split="train", **kw),
                data_mod.make_source(a.task, split="eval", **kw))
    except data_mod.DataError as e:
        raise UsageError(str(e), e.flag) from None


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


def open_text(a: TrainArgs):
    if a.task != "text":
        return None
    try:
        return data_mod.load_tokens(a.data, a.eos_id, a.tokenizer)
    except data_mod.DataError as e:
        raise UsageError(str(e), e.flag) from None


class Session:
    """Model, optimizer, mesh and jitted steps of a run (shared by training and evaluation)."""

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
        self.batch_sharding = shd.batch_sharding(mesh)
        self.repl = shd.replicated(mesh)
        self._train_step = None
        self._eval_step = None

    def init_state(self, params=None) -> loop.TrainState:
        """A fresh train state from ``params`` (``None``: the model's initialisation)."""
        if params is None:
            params = self.fns.init(self.param_shardings)
        init = jax.jit(lambda p: loop.init_train_state(p, self.tx, self.args.seed),
                       out_shardings=self.state_shardings)
        return init(params)

    def restore_rest(self) -> None:
        """Materialises the model's non-param state (none for QDeltaLM) without keeping params."""
        if jax.tree.leaves(self.fns.abstract_rest):
            self.fns.init(self.param_shardings)

    def _batch_shardings(self, batch):
        return {k: self.batch_sharding for k in batch}

    def train_step(self, state, batch):
        if self._train_step is None:
            fn = loop.make_train_step(self.fns, self.tx, self.args.grad_accum,
                                      loop.lr_schedule(self.ocfg), self.args.train_accuracy)
            self._train_step = jax.jit(
                fn,
                in_shardings=(self.state_shardings, self._batch_shardings(batch)),
                out_shardings=(self.state_shardings, self.repl),
                donate_argnums=0,
            )
        # Traced under the mesh so that the Pallas op splits the batch per device (ops.py).
        with jax.set_mesh(self.mesh):
            return self._train_step(state, batch)

    def eval_step(self, params, batch):
        if self._eval_step is None:
            self._eval_step = jax.jit(
                loop.make_eval_step(self.fns),
                in_shardings=(self.state_shardings.params, self._batch_shardings(batch)),
                out_shardings=self.repl,
            )
        with jax.set_mesh(self.mesh):
            return self._eval_step(params, batch)

    def evaluate(self, params, source, n_batches: int) -> dict[str, float]:
        B = source.batch_size
        rows = shd.process_rows(self.mesh, B) if jax.process_count() > 1 else None
        text = isinstance(source, data_mod.TextData)
        sums, n_bytes = [], 0
        for i in range(n_batches):
            batch = source.batch(i, rows)
            sums.append(self.eval_step(params, shd.shard_batch(batch, self.mesh, rows, B)))
            if text and n_bytes is not None:  # bytes of the whole batch, on every process
                n = source.target_bytes(batch if rows is None else source.batch(i))
                n_bytes = None if n is None else n_bytes + n
        out = loop.summarise_eval(jax.device_get(sums))
        if text:
            from qdelta_jax.train.evaluate import text_metrics

            out.update(text_metrics(out["loss"], out["tokens"], n_bytes))
        return out


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
    finite."""
    phase = phase or _Phase()
    t_start = time.perf_counter()
    validate(a)
    a = a.resolved()
    shd.maybe_initialize_distributed()
    main_process = jax.process_index() == 0
    phase.what = f"reading --data {a.data}"
    text_tokens = open_text(a)
    train_src, eval_src = make_sources(a, text_tokens=text_tokens)
    data_vocab, pretok = data_vocab_of(a, text_tokens)
    model_cfg = model_config_for(a, data_vocab, pretok)

    try:
        mesh = shd.make_mesh(a.mesh)
        shd.check_batch_size(a.batch_size, mesh, a.grad_accum)
    except shd.MeshError as e:
        raise UsageError(str(e), "--mesh") from None

    run_dir = Path(a.run_dir or default_run_dir(a))
    phase.what = f"opening --run-dir {run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} exists and is not a directory", "--run-dir")
    try:
        saved = ckpt.read_run_config(run_dir) if run_dir.exists() else None
    except ckpt.RunDirError as e:
        raise UsageError(str(e), "--run-dir") from None
    requested = {"model": model_cfg.to_dict(), "train": dataclasses.asdict(a)}
    requested["train"]["run_dir"] = str(run_dir)
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
        diffs = [d for d in ckpt.diff_dicts(
            {k: saved.get("train", {}).get(k) for k in _RESUME_SENSITIVE},
            {k: requested["train"].get(k) for k in _RESUME_SENSITIVE})]
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

    sess = Session(a, model_cfg, mesh)
    phase.what = f"opening the checkpoints in {run_dir / 'checkpoints'}"
    checkpointer = ckpt.Checkpointer(run_dir)
    phase.what = f"restoring a checkpoint from {run_dir / 'checkpoints'}"
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
                f"({checkpointer.health[steps[-1]].get('why')})", run_dir,
                checkpointer.last_good()))
        else:
            restored = checkpointer.restore_latest(sess.abstract_state.to_dict())
    except ckpt.RunDirError as e:
        checkpointer.close()
        raise UsageError(str(e), e.flag) from None
    # Each process reads only the rows of the global batch that its devices hold.
    rows = shd.process_rows(mesh, a.batch_size) if jax.process_count() > 1 else None
    it = data_mod.DataIterator(train_src, rows=rows)
    if restored is not None:
        step0, state_dict, data_state = restored
        state = loop.TrainState.from_dict(state_dict)
        it.load_state_dict(data_state)
        sess.restore_rest()
        log(f"resumed {run_dir} from step {step0}")
    else:
        step0 = 0
        init = None
        if a.init_from is not None:
            from qdelta_jax.train.params import restore_params

            phase.what = f"reading --init-from {a.init_from}"
            try:
                got, init = restore_params(a.init_from, model_cfg, shardings=sess.param_shardings,
                                           flag="--init-from")
            except ckpt.RunDirError as e:
                raise UsageError(str(e), "--init-from") from None
            log(f"initialised from {a.init_from} (step {got})")
        state = sess.init_state(init)
    if main_process:
        phase.what = f"updating {run_dir / 'metrics.jsonl'}"
        _trim_metrics(run_dir, step0)
    phase.resume = f"rerun with --run-dir {run_dir} to resume from the last checkpoint"
    n_params = loop.count_params(sess.fns.abstract_params)
    T = a.resolved_seq_len()
    tokens_per_step = a.batch_size * T
    fpt = loop.flops_per_token(sess.fns.abstract_params, model_cfg, T)
    n_dev = mesh.size
    dev_kind = jax.devices()[0].device_kind
    peak = loop.peak_flops(dev_kind, a.dtype, a.peak_tflops)
    log(f"run dir {run_dir}: {a.task}, preset {a.preset} ({n_params / 1e6:.2f}M params, vocab "
        f"{model_cfg.vocab_size}), batch {a.batch_size} x {T}, mesh data={mesh.shape['data']} "
        f"fsdp={mesh.shape['fsdp']} on {n_dev} {dev_kind}, steps {step0} -> {a.steps}")

    writer = MetricsWriter(run_dir, main_process)
    judge = _Judge(checkpointer, BLOWUP_FACTOR * math.log(max(model_cfg.vocab_size, 2)), step0)
    pbar = None
    if a.progress and main_process:
        from tqdm import tqdm

        # In a log file (not a terminal) redraw rarely, so the bar does not flood it.
        pbar = tqdm(total=a.steps, initial=step0, desc="train", dynamic_ncols=True,
                    file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def save(step, st):
        phase.what = f"saving checkpoint step {step} to {checkpointer.dir}"
        if checkpointer.save(step, st.to_dict(), {"index": int(step)}):
            judge.saved(step)
        phase.what = f"training (step {step})"

    last_eval: dict[str, float] | None = None
    step_times: list[float] = []
    stability = None
    if a.diagnostics:  # compiled once for the run
        from qdelta_jax import diagnostics

        stability = diagnostics.params_summary_fn(sess.fns)

    def do_eval(step, st):
        nonlocal last_eval
        nonlocal t_prev
        last_eval = sess.evaluate(st.params, eval_src, a.eval_batches)
        if stability is not None:  # beta * c of docs/MATH.md section 1 on the first eval batch
            from qdelta_jax import diagnostics

            last_eval["stability"] = diagnostics.compact(stability(st.params, eval_src.batch(0)))
        t_prev = time.perf_counter()  # keep evaluation time out of the next step's time
        writer.write({"step": step, "split": "eval", **last_eval})
        if pbar is not None:
            pbar.write(f"step {step}: {format_eval(last_eval, a.task)}")

    status, last_metrics = "done", {}
    pending = None  # (step number, metrics future)
    t_prev = time.perf_counter()
    stop_at = a.steps if a.stop_after is None else min(a.steps, step0 + a.stop_after)

    def consume(step, m):
        nonlocal t_prev, last_metrics
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        tps = tokens_per_step / dt
        rec = {
            "step": step,
            "loss": _to_float(m["loss"]),
            **({"accuracy": float(m["accuracy"])} if "accuracy" in m else {}),
            "grad_norm": _to_float(m["grad_norm"]),
            "lr": float(m["lr"]),
            "skipped": int(m["skipped"]),
            "step_time_s": dt,
            "tokens_per_s": tps,
            "mfu": (fpt * tps / (n_dev * peak)) if peak else None,
        }
        if step > step0 + 1:
            step_times.append(dt)
        last_metrics = rec
        writer.write(rec)
        judge.step_done(rec)
        if pbar is not None:
            pbar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            pbar.update(1)
        if int(m["bad_steps"]) >= a.max_bad_steps:
            raise BadStepsError(_diverged_message(
                step, f"stopping at step {step}: {int(m['bad_steps'])} consecutive steps had a "
                f"non-finite loss or gradient norm (--max-bad-steps {a.max_bad_steps}); their "
                "updates were skipped", run_dir, checkpointer.last_good()))
        if not bool(m["finite"]) and pbar is not None:
            pbar.write(f"step {step}: non-finite loss or gradient norm; update skipped "
                       f"({int(m['bad_steps'])} in a row)")

    phase.what = f"training (step {step0})"
    try:
        with ckpt.StopSignal(multi_process=jax.process_count() > 1) as stop:
            step = step0
            while step < stop_at:
                batch = shd.shard_batch(next(it), mesh, rows, a.batch_size)
                state, metrics = sess.train_step(state, batch)
                step += 1
                if pending is not None:
                    consume(*pending)
                pending = (step, metrics)
                if a.save_every and step % a.save_every == 0 and step < a.steps:
                    save(step, state)
                if a.eval_every and step % a.eval_every == 0 and step < a.steps:
                    consume(*pending)
                    pending = None
                    do_eval(step, state)
                if stop.should_stop(step):
                    status = "interrupted"
                    break
            if pending is not None:
                consume(*pending)
                pending = None
            if step < a.steps and status == "done":
                status = "stopped"
            save(step, state)
            if status == "done":
                do_eval(step, state)
                judge.final(step, last_eval["loss"])
    except BadStepsError:
        checkpointer.wait()
        raise
    finally:
        if pbar is not None:
            pbar.close()
        if sys.exc_info()[0] is None:  # else keep naming what failed
            phase.what = f"finishing the checkpoint writes in {checkpointer.dir}"
        try:
            checkpointer.wait()
            checkpointer.prune()
        finally:
            checkpointer.close()
            writer.close()

    wall = time.perf_counter() - t_start
    mean_dt = float(np.mean(step_times)) if step_times else None
    tps = tokens_per_step / mean_dt if mean_dt else None
    last_good = checkpointer.last_good()
    summary = {
        "status": status,
        "task": a.task,
        "run_dir": str(run_dir),
        "step": int(step),
        "steps": a.steps,
        "loss": last_metrics.get("loss"),
        "eval": last_eval,
        "skipped_steps": last_metrics.get("skipped"),
        "last_good_step": last_good,
        "final_checkpoint_bad": checkpointer.is_bad(step),
        "params": n_params,
        "step_time_s": mean_dt,
        "tokens_per_s": tps,
        "mfu": (fpt * tps / (n_dev * peak)) if (peak and tps) else None,
        "flops_per_token": fpt,
        "devices": n_dev,
        "device_kind": dev_kind,
        "wall_s": wall,
    }
    if main_process:
        phase.what = f"writing {run_dir / 'summary.json'}"
        with open(run_dir / "summary.json", "w") as f:
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
