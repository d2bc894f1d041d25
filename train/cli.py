"""``qdelta-train``: train a Q-Delta LM on MQAR, needle-in-a-haystack or text.

With no flags it trains the tiny preset on MQAR on the CPU (a few minutes on two cores) and prints
the recall accuracy it reached. Options can also come from ``--config FILE`` (JSON, or TOML for a
``.toml`` file) whose keys are the option names (``batch-size`` or ``batch_size``), checked exactly
like flags; flags given on the command line override the file. Rerunning with an existing
``--run-dir`` resumes it with the options it was started with; options given again with another
value override those, with a warning that lists them. Bad options exit with status 2 and a
one-line error; a divergence or a file-system failure (disk full, read-only path) with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from qdelta_jax.train import trainer
from qdelta_jax.train.checkpoint import RunDirError, quiet_orbax_logs, read_run_config
from qdelta_jax.train.trainer import TrainArgs, UsageError

PROG = "qdelta-train"


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _opt(conv):
    def f(v):
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            return None
        return conv(v)

    f.__name__ = conv.__name__
    return f


def _int(v):
    # The same rule for a flag (a string) and a config-file value (a JSON/TOML number): 2.0 is
    # 2, while 2.5, "2.5" and true are refused rather than truncated.
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


def _argtype(conv):
    """``conv`` for argparse: its own message instead of argparse's "invalid _int value"."""

    def f(v):
        try:
            return conv(v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    f.__name__ = conv.__name__
    return f


def _str(v):
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


# name -> (converter, help). Defaults live in TrainArgs.
OPTIONS: dict[str, tuple[Any, str]] = {
    "preset": (_str, "model preset: tiny (CPU), 340m, 1b"),
    "task": (_str, "mqar | niah | text"),
    "data": (_opt(_str), "text data: a UTF-8 file or folder, a .bin (uint16; *.u32.bin: uint32) "
                         "or .npy token file, or a folder of .bin shards (qdelta-tokenize) "
                         "(--task text)"),
    "steps": (_int, "total optimizer steps (the lr schedule spans them)"),
    "batch_size": (_opt(_int), "global batch size (rows), split over the mesh (default: mqar "
                               "128, niah 16, text 16)"),
    "seq_len": (_opt(_int), "tokens per row (default: mqar 64, niah 512, text 512)"),
    "lr": (_float, "peak learning rate"),
    "warmup": (_int, "linear warm-up steps"),
    "weight_decay": (_float, "AdamW weight decay (not on A_log, dt_bias, norms, biases)"),
    "save_every": (_int, "checkpoint every N steps (0: only at the end)"),
    "eval_every": (_int, "evaluate every N steps (0: only at the end)"),
    "eval_batches": (_int, "batches per evaluation"),
    "run_dir": (_opt(_str), "run directory; an existing one is resumed "
                            "(default runs/<task>-<preset>-<time>)"),
    "mesh": (_opt(_str), "device mesh, e.g. data=4,fsdp=2 (default: all devices on data)"),
    "seed": (_int, "seed for the model init and the data"),
    "num_pairs": (_int, "MQAR key-value pairs per row"),
    "mqar_vocab": (_int, "MQAR vocabulary size (noise, key and value tokens)"),
    "niah_variant": (_str, "needle task: passkey | number | uuid"),
    "eos_id": (_opt(_int), "end-of-document id of a .bin/.npy file (document boundaries); "
                           "with --tokenizer it overrides the tokenizer's"),
    "tokenizer": (_opt(_str), "a Hugging Face tokenizers JSON file: --task text tokenises the "
                              "text with it instead of bytes (vocabulary and EOS from it); "
                              "copied into the run directory"),
    "grad_accum": (_int, "micro-batches per step (gradient accumulation)"),
    "dtype": (_str, "compute dtype: float32 | bfloat16"),
    "param_dtype": (_str, "parameter dtype: float32 | bfloat16 (bfloat16: the optimizer keeps "
                          "a float32 master copy)"),
    "train_accuracy": (_bool, "log the token accuracy of every training batch (an argmax over "
                              "the vocabulary per token)"),
    "implementation": (_opt(_str), "Q-Delta op: reference | xla | pallas (default: pallas on "
                                   "GPU, xla elsewhere)"),
    "fixed_lam": (_opt(_float), "ablation: a fixed lam instead of the learned one"),
    "no_decay_gate": (_bool, "ablation: no decay gate (a = 1)"),
    "remat": (_bool, "recompute each block in the backward pass (saves memory)"),
    "save_residuals": (_opt(_bool), "Pallas kernels: keep the forward's per-chunk W, T, h_in, D"
                                    " for the backward (default, unless "
                                    "QDELTA_SAVE_RESIDUALS=0)"),
    "model_overrides": (_opt(_str), "model config fields, e.g. hidden_size=128,num_heads=4"),
    "max_bad_steps": (_int, "stop after this many consecutive non-finite steps"),
    "stop_after": (_opt(_int), "stop (with a checkpoint) after N steps of this invocation; the "
                               "schedule still spans --steps"),
    "resume_from": (_opt(_int), "resume --run-dir from this saved step instead of the newest "
                                "(the newer checkpoints move to RUN_DIR/superseded/)"),
    "peak_tflops": (_opt(_float), "peak TFLOP/s of one device for MFU (default: by device kind)"),
    "progress": (_bool, "show the progress bar"),
    "init_from": (_opt(_str), "start from these parameters: a qdelta-convert params directory "
                              "or another run directory (its newest good checkpoint); the model "
                              "config comes from there (--preset and size overrides are not "
                              "used)"),
    "diagnostics": (_bool, "add the stability diagnostic (beta * c, docs/MATH.md section 1) to "
                           "every eval line of metrics.jsonl"),
}
BOOL_FLAGS = {"no_decay_gate", "remat", "diagnostics", "train_accuracy"}
# Options on by default, turned off by a --no-... flag.
NEGATED_FLAGS = {
    "progress": "hide the progress bar",
    "save_residuals": "Pallas kernels: recompute the forward's per-chunk W, T, h_in, D in the "
                      "backward instead of keeping them (less memory, slower)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 2 with one line, no traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        argument_default=argparse.SUPPRESS,
    )
    defaults = dataclasses.asdict(TrainArgs())
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options")
    for name, (conv, help_) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        d = defaults[name]
        if name in BOOL_FLAGS:
            p.add_argument(flag, dest=name, action="store_const", const=True, help=help_)
        elif name in NEGATED_FLAGS:
            p.add_argument(flag.replace("--", "--no-", 1), dest=name, action="store_const",
                           const=False, help=NEGATED_FLAGS[name])
        else:
            shown = help_ if d is None or "default" in help_ else f"{help_} (default: {d})"
            p.add_argument(flag, dest=name, type=_argtype(conv),
                           metavar=name.split("_")[-1].upper(),
                           help=shown)
    return p


def load_config_file(path: str) -> dict[str, Any]:
    """Reads a JSON or TOML options file; keys are option names with ``-`` or ``_``."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file", "--config")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot be read ({e})", "--config") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 -- any parse failure is the user's file
        raise UsageError(f"--config {path}: cannot parse ({e})", "--config") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a table/object of options", "--config")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            raise UsageError(f"--config {path}: unknown option {key!r}", "--config")
        conv = OPTIONS[name][0]
        try:
            out[name] = conv(value)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--config {path}: bad value for {key!r}: {e}", "--config") from None
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: list[str] | None = None, *, warn=None) -> TrainArgs:
    """Options from the flags, over ``--config FILE``, over the options saved in an existing
    ``--run-dir`` (so a rerun with only ``--run-dir`` continues the run as it was started).
    Options given again with another value override the saved ones; ``warn`` (default: print
    to stderr) gets one line listing them."""
    ns = vars(build_parser().parse_args(argv))
    config = ns.pop("config", None)
    values = load_config_file(config) if config else {}
    values.update(ns)  # flags override the file
    run_dir = values.get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        try:
            saved = read_run_config(run_dir)
        except RunDirError as e:
            raise UsageError(str(e), "--run-dir") from None
        if saved is not None:
            fields = {f.name for f in dataclasses.fields(TrainArgs)}
            base = {k: v for k, v in saved["train"].items()
                    if k in fields and k not in trainer.PER_INVOCATION}
            changed = [k for k, v in values.items()
                       if k in base and k not in trainer.PER_INVOCATION and v != base[k]]
            if changed:
                (warn or _warn)(
                    f"warning: --run-dir {run_dir} was started with other options; overriding "
                    "them with " + ", ".join(f"{_flag(k)} {values[k]!r} (saved {base[k]!r})"
                                             for k in changed))
            values = {**base, **values}
    return TrainArgs(**values)


def _warn(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        with quiet_orbax_logs():
            args = parse_args(argv)
            summary = trainer.run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (trainer.BadStepsError, trainer.RunIOError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(trainer.format_summary(summary))
    if summary["status"] in ("interrupted", "stopped"):
        print(f"checkpoint saved; resume with: {PROG} --run-dir {summary['run_dir']}")
    if summary.get("final_checkpoint_bad"):
        good = summary.get("last_good_step")
        print(f"{PROG}: warning: the final checkpoint is marked bad (its loss blew up or was not "
              "finite); " + (f"the last good one is step {good} (--resume-from {good})"
                             if good is not None else "no checkpoint is marked good"),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
