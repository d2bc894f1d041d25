"""The options of ``qdelta-train``, declared once: :class:`TrainArgs`.

Each field of :class:`TrainArgs` carries its default, the converter that checks a value (the
same one for a flag, a ``--config`` file entry and a programmatic value), its help text, how its
flag is spelled (a value, a switch, or a ``--no-...`` flag for an option on by default) and
whether it belongs to one invocation (``--run-dir``, ``--stop-after``, ...) or changes what a
resumed run computes. Everything else reads these fields:

* the ``qdelta-train`` parser is built from them (:func:`qdelta_jax.train.cli.build_parser`),
  and ``--config`` files are checked by :func:`convert_values`;
* the programmatic API is ``qdelta_jax.train.trainer.run(TrainArgs(...))``, checked by
  :func:`validate`;
* a run directory's ``config.json`` and ``summary.json`` record :meth:`TrainArgs.to_dict`, and a
  rerun reads them back with :func:`saved_values`.

:func:`make_sources` and :func:`open_text` turn a run's options into its data (shared by
training and ``qdelta-eval``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from qdelta_jax.train import data as data_mod


class UsageError(ValueError):
    """A bad option value; ``flag`` names the option. The CLIs print it and exit with 2."""

    def __init__(self, message: str, flag: str | None = None):
        super().__init__(message)
        self.flag = flag


# ----------------------------------------------------------------------------------------------
# Converters: one rule for a flag (a string), a config-file value (a JSON/TOML value) and a
# value set in Python.


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _optional(conv):
    def f(v):
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            return None
        return conv(v)

    f.__name__ = conv.__name__
    return f


def _int(v):
    # 2.0 is 2, while 2.5, "2.5" and true are refused rather than truncated.
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"expected an integer, got {v!r}")
        return int(v)
    if isinstance(v, str):
        t = v.strip()
        try:
            return int(t)
        except ValueError:
            try:
                f = float(t)
            except ValueError:
                raise ValueError(f"expected an integer, got {v!r}") from None
            if f.is_integer():
                return int(f)
            raise ValueError(f"expected an integer, got {v!r}") from None
    if isinstance(v, int):
        return v
    raise ValueError(f"expected an integer, got {v!r}")


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"expected a number, got {v!r}")
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"expected a number, got {v!r}") from None


def _str(v):
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------
# The declaration

VALUE, SWITCH, NEGATED = "value", "switch", "negated"


def option(default: Any, convert, help: str, *, kind: str = VALUE, off_help: str | None = None,
           per_invocation: bool = False, resume_sensitive: bool = False):
    """A :class:`TrainArgs` field. ``kind``: ``VALUE`` (``--name X``), ``SWITCH`` (``--name``
    sets True) or ``NEGATED`` (``--no-name`` sets False; ``off_help`` is its help).
    ``per_invocation``: not reused from a run directory's saved options. ``resume_sensitive``:
    changing it between invocations makes a resumed run differ from an uninterrupted one."""
    return dataclasses.field(default=default, metadata={
        "convert": convert, "help": help, "kind": kind, "off_help": off_help,
        "per_invocation": per_invocation, "resume_sensitive": resume_sensitive})


# Per-task defaults of --seq-len and --batch-size (None in TrainArgs).
TASK_SEQ_LEN = {"mqar": 64, "niah": 512, "text": 512}
TASK_BATCH = {"mqar": 128, "niah": 16, "text": 16}


@dataclasses.dataclass
class TrainArgs:
    """Every option of ``qdelta-train``; the flag is the field name with dashes (see
    :func:`flag_of`)."""

    preset: str = option("tiny", _str, "model preset: tiny (CPU), 340m, 1b")
    task: str = option("mqar", _str, "mqar | niah | text", resume_sensitive=True)
    data: str | None = option(
        None, _optional(_str), "text data: a UTF-8 file or folder, a .bin (uint16; *.u32.bin: "
        "uint32) or .npy token file, or a folder of .bin shards (qdelta-tokenize) (--task text)",
        resume_sensitive=True)
    steps: int = option(200, _int, "total optimizer steps (the lr schedule spans them)",
                        resume_sensitive=True)
    batch_size: int | None = option(
        None, _optional(_int), "global batch size (rows), split over the mesh (default: mqar "
        "128, niah 16, text 16)", resume_sensitive=True)
    seq_len: int | None = option(None, _optional(_int), "tokens per row (default: mqar 64, niah "
                                 "512, text 512)", resume_sensitive=True)
    lr: float = option(3e-3, _float, "peak learning rate", resume_sensitive=True)
    warmup: int = option(20, _int, "linear warm-up steps", resume_sensitive=True)
    weight_decay: float = option(0.1, _float, "AdamW weight decay (not on A_log, dt_bias, norms, "
                                 "biases)", resume_sensitive=True)
    save_every: int = option(100, _int, "checkpoint every N steps (0: only at the end)")
    eval_every: int = option(50, _int, "evaluate every N steps (0: only at the end)")
    eval_batches: int = option(4, _int, "batches per evaluation")
    run_dir: str | None = option(None, _optional(_str), "run directory; an existing one is "
                                 "resumed (default runs/<task>-<preset>-<time>)",
                                 per_invocation=True)
    mesh: str | None = option(None, _optional(_str), "device mesh, e.g. data=4,fsdp=2 (default: "
                              "all devices on data)")
    seed: int = option(0, _int, "seed for the model init and the data", resume_sensitive=True)
    num_pairs: int = option(4, _int, "MQAR key-value pairs per row", resume_sensitive=True)
    mqar_vocab: int = option(64, _int, "MQAR vocabulary size (noise, key and value tokens)",
                             resume_sensitive=True)
    niah_variant: str = option("passkey", _str, "needle task: passkey | number | uuid",
                               resume_sensitive=True)
    eos_id: int | None = option(
        None, _optional(_int), "end-of-document id of a .bin/.npy file (document boundaries); "
        "with --tokenizer it overrides the tokenizer's", resume_sensitive=True)
    tokenizer: str | None = option(
        None, _optional(_str), "a Hugging Face tokenizers JSON file: --task text tokenises the "
        "text with it instead of bytes (vocabulary and EOS from it); copied into the run "
        "directory", resume_sensitive=True)
    grad_accum: int = option(1, _int, "micro-batches per step (gradient accumulation)",
                             resume_sensitive=True)
    dtype: str = option("float32", _str, "compute dtype: float32 | bfloat16")
    param_dtype: str = option("float32", _str, "parameter dtype: float32 | bfloat16 (bfloat16: "
                              "the optimizer keeps a float32 master copy)")
    train_accuracy: bool = option(False, _bool, "log the token accuracy of every training batch "
                                  "(an argmax over the vocabulary per token)", kind=SWITCH)
    implementation: str | None = option(
        None, _optional(_str), "Q-Delta op: reference | xla | pallas (default: pallas on GPU, "
        "xla elsewhere)")
    fixed_lam: float | None = option(None, _optional(_float), "ablation: a fixed lam instead of "
                                     "the learned one")
    no_decay_gate: bool = option(False, _bool, "ablation: no decay gate (a = 1)", kind=SWITCH)
    remat: bool = option(False, _bool, "recompute each block in the backward pass (saves "
                         "memory)", kind=SWITCH)
    save_residuals: bool | None = option(
        None, _optional(_bool), "Pallas kernels: keep the forward's per-chunk W, T, h_in, D for "
        "the backward (default, unless QDELTA_SAVE_RESIDUALS=0)", kind=NEGATED,
        off_help="Pallas kernels: recompute the forward's per-chunk W, T, h_in, D in the "
        "backward instead of keeping them (less memory, slower)")
    model_overrides: str | None = option(None, _optional(_str), "model config fields, e.g. "
                                         "hidden_size=128,num_heads=4")
    max_bad_steps: int = option(10, _int, "stop after this many consecutive non-finite steps")
    stop_after: int | None = option(
        None, _optional(_int), "stop (with a checkpoint) after N steps of this invocation; the "
        "schedule still spans --steps", per_invocation=True)
    resume_from: int | None = option(
        None, _optional(_int), "resume --run-dir from this saved step instead of the newest "
        "(the newer checkpoints move to RUN_DIR/superseded/)", per_invocation=True)
    peak_tflops: float | None = option(None, _optional(_float), "peak TFLOP/s of one device for "
                                       "MFU (default: by device kind)")
    progress: bool = option(True, _bool, "show the progress bar", kind=NEGATED,
                            off_help="hide the progress bar", per_invocation=True)
    diagnostics: bool = option(False, _bool, "add the stability diagnostic (beta * c, "
                               "docs/MATH.md section 1) to every eval line of metrics.jsonl",
                               kind=SWITCH)
    init_from: str | None = option(
        None, _optional(_str), "start from these parameters: a qdelta-convert params directory "
        "or another run directory (its newest good checkpoint); the model config comes from "
        "there (--preset and size overrides are not used)")

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

    def to_dict(self) -> dict[str, Any]:
        """The options as saved in ``config.json`` and ``summary.json``."""
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainArgs)}
# Options that belong to one invocation: not reused from a run directory's saved options.
PER_INVOCATION = tuple(n for n, f in FIELDS.items() if f.metadata["per_invocation"])
# Options whose change between invocations changes what a resumed run computes.
RESUME_SENSITIVE = tuple(n for n, f in FIELDS.items() if f.metadata["resume_sensitive"])


def flag_of(name: str) -> str:
    """The command-line flag of option ``name`` (``--no-...`` for an option on by default)."""
    flag = "--" + name.replace("_", "-")
    return flag.replace("--", "--no-", 1) if FIELDS[name].metadata["kind"] == NEGATED else flag


def convert_values(raw: dict[str, Any], *, where: str, flag: str) -> dict[str, Any]:
    """Options from a mapping (a ``--config`` file): keys are option names with ``-`` or ``_``,
    each value checked by its option's converter. Raises :class:`UsageError` (``where``: how the
    message starts, ``flag``: the option to blame) for an unknown key or a bad value."""
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise UsageError(f"{where}: unknown option {key!r}", flag)
        try:
            out[name] = FIELDS[name].metadata["convert"](value)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{where}: bad value for {key!r}: {e}", flag) from None
    return out


def saved_values(train: dict[str, Any], *, per_invocation: bool = True) -> dict[str, Any]:
    """The options in a run directory's saved ``train`` block that this version knows
    (``per_invocation=False`` leaves out :data:`PER_INVOCATION`, which a rerun does not reuse)."""
    return {k: v for k, v in train.items()
            if k in FIELDS and (per_invocation or k not in PER_INVOCATION)}


def validate(a: TrainArgs) -> None:
    """Raises :class:`UsageError` naming the flag of the first option whose value is bad."""
    from qdelta_jax.model import DTYPES, PRESETS
    from qdelta_jax.ops import IMPLEMENTATIONS

    def need(cond, name, msg):
        if not cond:
            raise UsageError(f"{flag_of(name)} {msg}", flag_of(name))

    need(a.preset in PRESETS, "preset", f"{a.preset!r} is unknown; presets: "
         + ", ".join(sorted(PRESETS)))
    need(a.task in data_mod.TASKS, "task", f"{a.task!r} is unknown; tasks: "
         + ", ".join(data_mod.TASKS))
    need(a.steps >= 1, "steps", f"must be >= 1, got {a.steps}")
    a = a.resolved()
    need(a.batch_size >= 1, "batch_size", f"must be >= 1, got {a.batch_size}")
    need(a.seq_len is None or a.seq_len >= 2, "seq_len", f"must be >= 2, got {a.seq_len}")
    need(math.isfinite(a.lr) and a.lr > 0, "lr", f"must be a positive number, got {a.lr}")
    need(a.warmup >= 0, "warmup", f"must be >= 0, got {a.warmup}")
    need(a.weight_decay >= 0, "weight_decay", f"must be >= 0, got {a.weight_decay}")
    need(a.save_every >= 0, "save_every", f"must be >= 0 (0: only at the end), got "
         f"{a.save_every}")
    need(a.eval_every >= 0, "eval_every", f"must be >= 0 (0: only at the end), got "
         f"{a.eval_every}")
    need(a.eval_batches >= 1, "eval_batches", f"must be >= 1, got {a.eval_batches}")
    need(a.grad_accum >= 1, "grad_accum", f"must be >= 1, got {a.grad_accum}")
    need(a.batch_size % a.grad_accum == 0, "grad_accum",
         f"{a.grad_accum} must divide --batch-size {a.batch_size}")
    need(a.max_bad_steps >= 1, "max_bad_steps", f"must be >= 1, got {a.max_bad_steps}")
    need(a.stop_after is None or a.stop_after >= 1, "stop_after",
         f"must be >= 1, got {a.stop_after}")
    need(a.resume_from is None or a.resume_from >= 1, "resume_from",
         f"must be a saved step >= 1, got {a.resume_from}")
    need(a.resume_from is None or a.run_dir is not None, "resume_from",
         "needs --run-dir (the run to resume)")
    need(a.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {a.dtype!r}")
    need(a.param_dtype in DTYPES, "param_dtype",
         f"must be one of {', '.join(DTYPES)}, got {a.param_dtype!r}")
    need(a.implementation in (None, *IMPLEMENTATIONS), "implementation",
         f"must be one of {', '.join(IMPLEMENTATIONS)}, got {a.implementation!r}")
    need(a.save_residuals is None or a.implementation is None
         or a.implementation.startswith("pallas"), "save_residuals",
         f"applies to the pallas implementation only, not --implementation {a.implementation}")
    need(a.fixed_lam is None or math.isfinite(a.fixed_lam), "fixed_lam",
         f"must be a finite number, got {a.fixed_lam}")
    need(a.num_pairs >= 1, "num_pairs", f"must be >= 1, got {a.num_pairs}")
    need(a.mqar_vocab >= 8, "mqar_vocab", f"must be >= 8, got {a.mqar_vocab}")
    need(a.task != "text" or a.data is not None, "data",
         "is required with --task text (a UTF-8 file or folder, a .bin or a .npy token file)")
    need(a.data is None or a.task == "text", "data",
         f"is only read by --task text (got --task {a.task}); add --task text or drop --data")
    need(a.eos_id is None or a.task == "text", "eos_id",
         f"applies to --task text only (got --task {a.task})")
    need(a.tokenizer is None or a.task == "text", "tokenizer",
         f"applies to --task text only (got --task {a.task})")
    if a.data is not None and not Path(a.data).exists():
        raise UsageError(f"--data {a.data}: no such file or directory", "--data")


# ----------------------------------------------------------------------------------------------
# What the options say about the data


def open_text(a: TrainArgs):
    """The token stream of a ``--task text`` run (``None`` for the built-in tasks)."""
    if a.task != "text":
        return None
    try:
        return data_mod.load_tokens(a.data, a.eos_id, a.tokenizer)
    except data_mod.DataError as e:
        raise UsageError(str(e), e.flag) from None


def make_sources(a: TrainArgs, batch_size: int | None = None, seq_len: int | None = None,
                 text_tokens=None, depth=None):
    """``(train, eval)`` data sources of the run's task; ``batch_size``, ``seq_len`` and the
    needle ``depth`` override the run's (evaluation at other lengths)."""
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
