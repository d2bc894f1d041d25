"""``qdelta-eval RUN_DIR``: a trained run evaluated by sequence length (and needle depth): recall
accuracy for the recall tasks, loss, perplexity and bits per byte for text.

Opens the run read-only (nothing in it is moved or deleted; a checkpoint that does not read back
or does not match its checksums is skipped with a warning, and so is one marked bad after a
divergence), loads ``RUN_DIR/config.json`` and the newest usable checkpoint, evaluates on held-out
batches of the run's task at several sequence lengths (default: 0.5x, 1x, 2x and 4x the training
length, those the task allows; the recurrent model runs at any length) and, for ``niah``, at
needle depths 0, 0.25, 0.5, 0.75 and 1. Prints a table and writes ``RUN_DIR/eval.json`` and
``RUN_DIR/eval_recall.png`` (text: ``eval_text.png``) (or into ``--out DIR``; the plot needs
matplotlib; without it the table is still printed).

Columns of the recall tasks: ``accuracy`` is token accuracy on the masked positions (MQAR: the
queried values; niah: the answer bytes), ``exact`` the share of rows whose masked positions are
all right (niah: exact-match answers), ``loss`` the masked cross-entropy (nats per token).
Columns of text: ``loss``, ``ppl`` (perplexity, ``exp(loss)``) and ``bpb`` (bits per byte, see
:func:`text_metrics`; ``-`` for pre-tokenised ids without a tokenizer). A text run's tokenizer
(``RUN_DIR/tokenizer.json``, copied there by ``qdelta-train``) tokenises the evaluation text and
gives the byte counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import jax

from qdelta_jax.train import checkpoint as ckpt
from qdelta_jax.train import data as data_mod
from qdelta_jax.train import loop
from qdelta_jax.train import sharding as shd
from qdelta_jax.train.options import TrainArgs, UsageError, make_sources, open_text
from qdelta_jax.train.params import load_run

PROG = "qdelta-eval"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Evaluator:
    """A model's compiled eval step over a device mesh, and the evaluation of a data source
    with it: used by the trainer's evaluations and by ``qdelta-eval``.

    ``param_shardings`` is how the parameters it gets are laid out; batches are split by rows
    over the mesh. The step is traced under ``jax.set_mesh(mesh)`` so that the Pallas op splits
    the batch per device.
    """

    def __init__(self, fns: loop.ModelFns, mesh, param_shardings):
        self.mesh = mesh
        self.step = jax.jit(loop.make_eval_step(fns),
                            in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                            out_shardings=shd.replicated(mesh))

    def eval_step(self, params, batch) -> dict:
        """The sums of one batch (:func:`qdelta_jax.train.loop.make_eval_step`)."""
        with jax.set_mesh(self.mesh):
            return self.step(params, batch)

    def __call__(self, params, source, n_batches: int) -> dict[str, float]:
        """Loss, accuracy and exact match over the first ``n_batches`` batches of ``source``
        (text: also perplexity and bits per byte, :func:`text_metrics`)."""
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
            out.update(text_metrics(out["loss"], out["tokens"], n_bytes))
        return out


def open_run(run_dir: Path, mesh_spec: str | None = None):
    """``(args, saved, evaluator)`` of a run directory: its training options (resolved; a text
    run's tokenizer is the run's copy), its newest checkpoint not marked bad that reads back
    (:func:`qdelta_jax.train.params.load_run`, parameters only, laid out over the mesh) and an
    :class:`Evaluator` of its model."""
    from flax import nnx

    from qdelta_jax.model import QDeltaLM

    try:
        mesh = shd.make_mesh(mesh_spec)
    except shd.MeshError as e:
        raise UsageError(str(e), "--mesh") from None
    try:
        saved = load_run(run_dir, mesh=mesh)
    except ckpt.RunDirError as e:
        raise UsageError(str(e), "RUN_DIR") from None
    if saved.options is None:
        raise UsageError(f"RUN_DIR {run_dir}: a params directory, not a qdelta-train run: it "
                         "names no task to evaluate on", "RUN_DIR")
    args = saved.options.resolved()
    if args.task == "text" and saved.tokenizer is not None:  # the run's copy outlives the original
        args = dataclasses.replace(args, tokenizer=str(saved.tokenizer))
    fns = loop.ModelFns(lambda: QDeltaLM(saved.config, rngs=nnx.Rngs(args.seed)))
    evaluator = Evaluator(fns, mesh, jax.tree.map(lambda x: x.sharding, saved.params))
    return args, saved, evaluator


def default_lengths(args: TrainArgs) -> list[int]:
    T = args.resolved_seq_len()
    return sorted({max(2, T // 2), T, 2 * T, 4 * T})


def evaluate_run(run_dir: str | Path, *, seq_lens=None, depths=None, batches: int | None = None,
                 batch_size: int | None = None, mesh: str | None = None, plot: bool = True,
                 out: str | Path | None = None, log=print) -> list[dict]:
    run_dir = Path(run_dir)
    _check_lists(seq_lens, depths, batches, batch_size)
    out = Path(out) if out is not None else run_dir
    args, saved, evaluator = open_run(run_dir, mesh)
    step = saved.step
    seq_lens = list(seq_lens or default_lengths(args))
    if args.task == "niah":
        depths = list(depths if depths is not None else DEPTHS)
    else:
        depths = [None]
    n = evaluator.mesh.size
    bs = batch_size or max(args.batch_size, n)
    if bs % n:
        raise UsageError(f"--batch-size {bs} must be a multiple of the {n} devices",
                         "--batch-size")
    batches = batches or args.eval_batches
    text_tokens = open_text(args)
    rows = []
    for T in seq_lens:
        for depth in depths:
            try:
                _, src = make_sources(args, batch_size=bs, seq_len=T, text_tokens=text_tokens,
                                      depth=depth)
            except UsageError as e:
                log(f"skipping seq_len {T}: {e}")
                break
            r = evaluator(saved.params, src, batches)
            rows.append({"seq_len": T, "depth": depth, **r})
    table = format_table(rows, args.task)
    log(f"{run_dir} ({args.task}, preset {args.preset}, step {step}):")
    log(table)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "eval.json", "w") as f:
            json.dump({"step": step, "task": args.task, "rows": rows}, f, indent=2)
    except OSError as e:
        raise UsageError(f"cannot write {out / 'eval.json'} ({e.strerror or e}); pass --out DIR "
                         "with a writable folder (the table above has the numbers)",
                         "--out") from None
    if plot:
        name = "eval_text.png" if args.task == "text" else "eval_recall.png"
        png = plot_rows(rows, args.task, out / name, step)
        log(f"plot: {png}" if png else "plot skipped: it needs matplotlib "
            "(pip install matplotlib); the table above has the numbers")
    return rows


def text_metrics(loss: float, tokens: float, n_bytes: int | None) -> dict[str, float | None]:
    """Perplexity and bits per byte of a text evaluation from its mean loss (nats per token)
    over ``tokens`` tokens: ``perplexity = exp(loss)``, ``bits_per_byte = loss * tokens /
    (ln 2 * n_bytes)``, where ``n_bytes`` counts the UTF-8 bytes of the text the evaluated
    tokens decode to (byte-level runs: one a token, none for the end-of-document token).
    Bits per byte compare across tokenizers; perplexity does not. ``n_bytes=None`` (ids without a
    tokenizer) or 0 gives ``bits_per_byte=None``."""
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    bpb = loss * tokens / (math.log(2) * n_bytes) if n_bytes else None
    return {"perplexity": ppl, "bits_per_byte": bpb, "bytes": n_bytes}


def format_table(rows: list[dict], task: str) -> str:
    if task == "text":
        head = ["seq_len", "loss", "ppl", "bpb", "tokens"]
        lines = ["  ".join(f"{h:>9}" for h in head)]
        for r in rows:
            bpb = r.get("bits_per_byte")
            lines.append("  ".join([f"{r['seq_len']:>9d}", f"{r['loss']:>9.4f}",
                                    f"{r['perplexity']:>9.3f}",
                                    f"{bpb:>9.4f}" if bpb is not None else f"{'-':>9}",
                                    f"{int(r['tokens']):>9d}"]))
        return "\n".join(lines)
    depth = task == "niah"
    head = ["seq_len"] + (["depth"] if depth else []) + ["accuracy", "exact", "loss", "tokens"]
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for r in rows:
        cells = [f"{r['seq_len']:>9d}"]
        if depth:
            cells.append(f"{r['depth']:>9.2f}")
        cells += [f"{r['accuracy']:>9.4f}", f"{r['exact_match']:>9.4f}", f"{r['loss']:>9.4f}",
                  f"{int(r['tokens']):>9d}"]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot_rows(rows: list[dict], task: str, path: Path, step: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = {"niah": "exact_match", "text": "bits_per_byte"}.get(task, "accuracy")
    if task == "text" and any(r.get(metric) is None for r in rows):
        metric = "loss"
    if task == "niah":
        for d in sorted({r["depth"] for r in rows}):
            sel = [r for r in rows if r["depth"] == d]
            ax.plot([r["seq_len"] for r in sel], [r[metric] for r in sel], "o-",
                    label=f"depth {d:.2f}")
        ax.legend()
    else:
        ax.plot([r["seq_len"] for r in rows], [r[metric] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    lengths = sorted({r["seq_len"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    if task != "text":
        ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length")
    ax.set_ylabel({"exact_match": "exact match", "accuracy": "recall accuracy",
                   "bits_per_byte": "bits per byte", "loss": "loss (nats per token)"}[metric])
    ax.set_title(f"{task}, step {step}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _check_lists(seq_lens, depths, batches, batch_size) -> None:
    if seq_lens is not None and (not seq_lens or any(int(t) < 2 for t in seq_lens)):
        raise UsageError(f"--seq-lens must be lengths >= 2, got {list(seq_lens)}", "--seq-lens")
    if depths is not None and (not depths or any(not 0.0 <= d <= 1.0 for d in depths)):
        raise UsageError(f"--depths must be needle depths in [0, 1], got {list(depths)}",
                         "--depths")
    if batches is not None and batches < 1:
        raise UsageError(f"--batches must be >= 1, got {batches}", "--batches")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}", "--batch-size")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a qdelta-train run by "
                                "sequence length: recall accuracy (and needle depth for niah), "
                                "or loss, perplexity and bits per byte for text.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--seq-lens", type=_ints, help="comma-separated lengths (default: 0.5x, 1x, "
                   "2x, 4x the training length)")
    p.add_argument("--depths", type=_floats, help="niah needle depths (default 0,.25,.5,.75,1)")
    p.add_argument("--batches", type=int, help="batches per cell (default: the run's "
                   "--eval-batches)")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: the run's)")
    p.add_argument("--mesh", help="device mesh, as for qdelta-train")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--out", help="folder for eval.json and the plot (default: RUN_DIR)")
    a = p.parse_args(argv)
    try:
        with ckpt.quiet_orbax_logs():
            evaluate_run(a.run_dir, seq_lens=a.seq_lens, depths=a.depths, batches=a.batches,
                         batch_size=a.batch_size, mesh=a.mesh, plot=not a.no_plot, out=a.out)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
