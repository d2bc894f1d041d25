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
import json
import sys
from pathlib import Path
from typing import Any

from qdelta_jax.train import trainer
from qdelta_jax.train.checkpoint import RunDirError, quiet_orbax_logs, read_run_config
from qdelta_jax.train.options import (
    FIELDS,
    NEGATED,
    SWITCH,
    TrainArgs,
    UsageError,
    convert_values,
    flag_of,
    saved_values,
)

PROG = "qdelta-train"


def _argtype(conv):
    """``conv`` for argparse: its own message instead of argparse's "invalid _int value"."""

    def f(v):
        try:
            return conv(v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    f.__name__ = conv.__name__
    return f


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 2 with one line, no traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``qdelta-train`` parser, one flag per :class:`~qdelta_jax.train.options.TrainArgs`
    field (its help, converter and default come from the field). Flags not given are left out
    of the result, so they do not override a ``--config`` file or a run's saved options."""
    p = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options")
    for name, field in FIELDS.items():
        meta = field.metadata
        if meta["kind"] == SWITCH:
            p.add_argument(flag_of(name), dest=name, action="store_const", const=True,
                           help=meta["help"])
        elif meta["kind"] == NEGATED:
            p.add_argument(flag_of(name), dest=name, action="store_const", const=False,
                           help=meta["off_help"])
        else:
            d, help_ = field.default, meta["help"]
            shown = help_ if d is None or "default" in help_ else f"{help_} (default: {d})"
            p.add_argument(flag_of(name), dest=name, type=_argtype(meta["convert"]),
                           metavar=name.split("_")[-1].upper(), help=shown)
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
    return convert_values(raw, where=f"--config {path}", flag="--config")


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
            base = saved_values(saved["train"], per_invocation=False)
            changed = [k for k, v in values.items() if k in base and v != base[k]]
            if changed:
                (warn or _warn)(
                    f"warning: --run-dir {run_dir} was started with other options; overriding "
                    "them with " + ", ".join(f"{flag_of(k)} {values[k]!r} (saved {base[k]!r})"
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
